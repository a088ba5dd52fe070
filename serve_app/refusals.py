"""The one refusal type of the request path, and its two renderings.

Anything refused before admission (4xx, 429, 503: no slot taken, no callback) is a `Refusal`.
Every route raises it; the HTTP edge renders it once: as ChatStream's JSON error
(`{"error": code, "message": ...}`) on ChatStream's routes, or as OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) on `/v1`. A 429 or 503 carries `Retry-After`
(whole seconds) and `retry-after-ms` (exact; the openai SDKs prefer it).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

logger = logging.getLogger("ray.serve")

# Retry-After of a 503 store_unavailable: a restarting store is usually back within seconds.
STORE_RETRY_AFTER_SEC = 2

# OpenAI's error `type` for each status we answer with.
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (RFC 9110; rounded up, at least 1) and the exact delay
    in `retry-after-ms`."""
    seconds = max(0.0, seconds)
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


class Refusal(Exception):
    """A request refused before admission. `code` is the machine reason (the rejection ledger
    and metrics count it); `param` names the offending field where there is one."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers.update(retry_after_headers(retry_after_s))
        self._error_type = error_type

    @property
    def error(self) -> str:
        """ChatStream's name for the code (the `error` field of its JSON errors)."""
        return self.code

    @property
    def reason(self) -> str:
        return self.code

    @property
    def type(self) -> str:
        """OpenAI's error type."""
        if self._error_type:
            return self._error_type
        if self.status_code >= 500 and self.status_code not in _OPENAI_TYPES:
            return "server_error"
        return _OPENAI_TYPES.get(self.status_code, "invalid_request_error")

    def chatstream_body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, openai: bool = False) -> JSONResponse:
        body = self.openai_body() if openai else self.chatstream_body()
        return JSONResponse(body, status_code=self.status_code, headers=self.headers)

    def sse(self) -> str:
        """The error as an SSE event, for a failure after an OpenAI stream started (the SDKs
        raise `APIError` on it)."""
        body = json.dumps(self.openai_body(), ensure_ascii=False, separators=(",", ":"))
        return f"data: {body}\n\n"


# ------------------------------------------------------------------ the refusals of every route
def invalid_request(message: str, param: str | None = None, code: str = "invalid_value") -> Refusal:
    return Refusal(400, code, message, param=param)


def unsupported_parameter(param: str, why: str = "is not supported by this server") -> Refusal:
    return invalid_request(f"'{param}' {why}", param, "unsupported_parameter")


def authentication_error(message: str = "a valid API key is required") -> Refusal:
    return Refusal(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str, served: str) -> Refusal:
    return Refusal(
        404,
        "model_not_found",
        f"The model '{model}' does not exist; this server serves '{served}'",
        param="model",
        error_type="invalid_request_error",
    )


def rate_limited(message: str, retry_after_s: float, code: str) -> Refusal:
    return Refusal(429, code, message, retry_after_s=retry_after_s)


def service_unavailable(
    message: str = "the session store cannot be reached right now; retry shortly",
    retry_after_s: float = STORE_RETRY_AFTER_SEC,
    code: str = "store_unavailable",
) -> Refusal:
    return Refusal(503, code, message, retry_after_s=retry_after_s)


def store_unavailable(exc: Exception) -> Refusal:
    """The 503 for any request that needs the state store while it cannot be reached."""
    logger.warning("state store unavailable: %s", exc)
    return service_unavailable()


def server_error(message: str = "generation failed; see server logs") -> Refusal:
    return Refusal(500, "unknown_error_occurred", message)
