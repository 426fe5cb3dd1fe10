"""The gateway's one exception tree, mapped once to HTTP status + OpenAI error JSON.

    GatewayError                      (500, the fallback; never raised for a client's mistake)
    ├── ClientError                   4xx: the request is at fault
    │   ├── InvalidRequest            400 invalid_request_error
    │   ├── Unauthorized              401 authentication_error
    │   ├── Forbidden                 403 permission_error
    │   ├── NotFound                  404 not_found_error
    │   ├── Conflict                  409 conflict_error
    │   ├── PayloadTooLarge           413 invalid_request_error
    │   ├── Unprocessable             422 invalid_request_error: well-formed, fails validation
    │   │   └── InvalidDataset        422: an upload with bad lines, each listed
    │   └── RateLimited               429 rate_limit_error (+ Retry-After)
    ├── ServiceError                  5xx: the gateway's world is at fault
    │   ├── UpstreamUnreachable       502 upstream_error
    │   │   └── BadUpstreamResponse   502 upstream_error (a 2xx answer that is not what it claims)
    │   ├── LocalBackendError         502 local_backend_error: the local model server failed
    │   ├── JudgeError                502 judge_error: the grader produced no verdict
    │   ├── Overloaded                503 overloaded_error (+ Retry-After): a full queue
    │   ├── CircuitOpen               503 upstream_unavailable (+ Retry-After): breaker open
    │   ├── StoreUnavailable          503 store_unavailable (+ Retry-After): the database failed
    │   └── UpstreamTimeout           504 timeout_error
    └── ConfigError                   500 config_error: the configuration cannot be used (also a
                                      ValueError, so pydantic validators may raise it)

Every one is mapped to HTTP in one place: `GatewayError.body()` / `headers()`, used by the /v1
edge (gateway/proxy/handler.py) and the Starlette app's exception handler (gateway/app.py).

Inside an already started stream the same body is sent as an SSE `data:` event instead.
"""

from __future__ import annotations

import math

import orjson


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        return b"data: " + self.body_bytes() + b"\n\n"

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
            # The precise wait, which the openai SDK prefers over the whole seconds above.
            headers.append((b"retry-after-ms", str(max(1, math.ceil(self.retry_after * 1000))).encode()))
        return headers


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(ClientError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class Unprocessable(ClientError):
    """A well-formed body whose content fails validation; `param` names the first bad field."""

    status = 422
    code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.param = param

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceError(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamUnreachable(ServiceError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class BadUpstreamResponse(UpstreamUnreachable):
    code = "upstream_invalid_response"


class Overloaded(ServiceError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"


class CircuitOpen(ServiceError):
    """The upstream's circuit breaker is open: failing fast instead of calling it."""

    status = 503
    type = "upstream_unavailable"
    code = "circuit_open"


class StoreUnavailable(ServiceError):
    """The store (SQLite or PostgreSQL) failed an admin or dashboard read or write: the
    database is down, locked or full. Proxying goes on; its records wait in the spill."""

    status = 503
    type = "service_unavailable_error"
    code = "store_unavailable"

    def __init__(self, message: str = "the gateway's store is unavailable; try again shortly"):
        super().__init__(message, retry_after=5.0)


class UpstreamTimeout(ServiceError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class LocalBackendError(ServiceError):
    """The local model server failed a control call or an answer the gateway asked for."""

    status = 502
    type = "upstream_error"
    code = "local_backend_error"


class JudgeError(ServiceError):
    """The judge could not produce a verdict (counted as a judge error, never as a fail)."""

    status = 502
    type = "upstream_error"
    code = "judge_error"


class ConfigError(GatewayError, ValueError):
    """The configuration cannot be used; the message names the offending key."""

    code = "config_error"


class InvalidDataset(Unprocessable):
    """An uploaded dataset with bad lines: every one is listed (up to a cap) beside the error."""

    code = "invalid_dataset"

    def __init__(self, message: str, errors: list[dict[str, object]]):
        super().__init__(message, param="body")
        self.errors = errors

    def body(self) -> dict[str, object]:
        return {**super().body(), "errors": self.errors}
