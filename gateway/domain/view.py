"""The small typed view of a request: only what the gateway needs to decide, nothing more.

The proxy forwards the client's bytes as they came; it never mutates the request it read,
except to rewrite `model` when a route says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest


@dataclass(slots=True)
class RequestView:
    body: dict[str, Any] | None
    model: str | None = None
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def parse(cls, raw: bytes, content_type: str) -> RequestView:
        """Read a JSON body's model/stream fields; other bodies (multipart uploads) pass as is."""
        if not raw or ("json" not in content_type and not (not content_type and raw[:1] == b"{")):
            return cls(body=None)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string", code="invalid_type")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise InvalidRequest("'stream' must be a boolean", code="invalid_type")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return cls(body=body, model=model, stream=bool(stream), include_usage=include_usage)

    def with_model(self, model: str) -> bytes:
        """The body with `model` replaced (only when a route rewrites it)."""
        assert self.body is not None
        try:
            return orjson.dumps({**self.body, "model": model})
        except orjson.JSONEncodeError:  # orjson writes 254 levels, where it reads 1024
            raise InvalidRequest("the request body nests too deeply", code="invalid_json") from None

    def for_model(self, model: str) -> RequestView:
        """This view with `model` in place of the client's, as a rewriting route sends it."""
        assert self.body is not None
        return RequestView({**self.body, "model": model}, model, self.stream, self.include_usage)
