"""The backend's one exception tree, mapped once to an HTTP status and OpenAI's error body.

BackendError                    500 server_error
├── InvalidRequest              400 invalid_request_error
│   ├── ContextLengthExceeded   400 code=context_length_exceeded
│   ├── InvalidSchema           400 code=invalid_schema
│   └── AdapterLoadError        400 code=invalid_adapter
├── ModelNotFound               404 code=model_not_found
├── Overloaded                  503 code=queue_full (Retry-After)
├── NotReady                    503 code=model_loading (Retry-After)
└── GenerationFailed            500 code=generation_failed
"""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"
    retry_after: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(BackendError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidSchema(InvalidRequest):
    code = "invalid_schema"


class AdapterLoadError(InvalidRequest):
    code = "invalid_adapter"


class ModelNotFound(BackendError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class Overloaded(BackendError):
    status_code = 503
    error_type = "service_unavailable"
    code = "queue_full"
    retry_after = 1


class NotReady(BackendError):
    status_code = 503
    error_type = "service_unavailable"
    code = "model_loading"
    retry_after = 2


class GenerationFailed(BackendError):
    code = "generation_failed"


class RouteNotFound(BackendError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(BackendError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"
