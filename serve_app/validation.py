"""Validation of what clients send to ChatStream's own routes; a failure is a `Refusal` (400,
413, 431) before admission."""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    ValidationError,
)

from serve_app.config import MaxNewTokens, Temperature, TopK, TopP
from serve_app.refusals import Refusal

REQUEST_ID_HEADER = "X-ChatStream-Request-Id"
# OpenAI's own request id header (the SDKs expose it as `_request_id`).
OPENAI_REQUEST_ID_HEADER = "x-request-id"
MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_USER_INPUT_CHARS = 32_000
# No request of ours nests deeper than a few levels; deep nesting only costs the decoder.
MAX_JSON_DEPTH = 32


def whole_number(value: Any) -> Any:
    """A float with no fraction as an int: JSON has one number type, so `73.0` is `73` (and
    documented integers accept it). Booleans and strings stay refused by strict validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A strict integer as JSON sees it (the API's integer parameters).
JSONInt = (Strict(), BeforeValidator(whole_number))


class GenerationOverrides(BaseModel):
    """Optional per-request or per-session generation parameters (validated ranges)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[Temperature, Strict()] | None = None
    top_k: Annotated[TopK, *JSONInt] | None = None
    top_p: Annotated[TopP, Strict()] | None = None
    max_new_tokens: Annotated[MaxNewTokens, *JSONInt] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The parameters that were given (only the generation fields, even on subclasses)."""
        return self.model_dump(include=set(GenerationOverrides.model_fields), exclude_none=True)


class ChatTurnRequest(GenerationOverrides):
    """The body of `POST /chat_stream`. Unknown keys are ignored (clients may send more)."""

    model_config = ConfigDict(extra="ignore")

    user_input: StrictStr | None = Field(None, max_length=MAX_USER_INPUT_CHARS)
    regenerate: StrictBool = False


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


# Headers larger than this (all of them together) get 431: Serve's proxy accepts far larger.
MAX_HEADER_BYTES = 65_536


def check_header_size(headers: Any) -> None:
    size = sum(len(name) + len(value) for name, value in headers.raw)
    if size > MAX_HEADER_BYTES:
        raise Refusal(
            431,
            "headers_too_large",
            f"the request's headers take {size} bytes, more than {MAX_HEADER_BYTES}; send fewer "
            "or shorter headers",
        )


async def read_body(request: Any, request_body: bytes | None, max_bytes: int) -> bytes:
    """The request's body, refused (413) beyond `max_bytes` without buffering more than that:
    a declared Content-Length over the limit is refused before anything is read. Oversized
    headers are refused first (431)."""
    check_header_size(request.headers)
    too_large = Refusal(
        413,
        "body_too_large",
        f"the request body is larger than {max_bytes} bytes; send a shorter one",
    )
    if request_body is not None:  # the route read it already
        if len(request_body) > max_bytes:
            raise too_large
        return request_body
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's cache: the body stays readable by `request.body()`
    return body


def json_depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether `value` nests objects/arrays deeper than `max_depth` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(body: bytes | str) -> Any:
    """Decode JSON from a client: malformed, or nested beyond MAX_JSON_DEPTH, is a 400."""
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refusal(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    except RecursionError:  # thousands of levels deep: the decoder gives up
        data = None
        too_deep = True
    else:
        too_deep = json_depth_exceeds(data, MAX_JSON_DEPTH)
    if too_deep:
        raise Refusal(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_json_object(body: bytes) -> dict[str, Any]:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise Refusal(400, "invalid_json", "the body must be a JSON object")
    return data


def parse_chat_turn(body: bytes) -> ChatTurnRequest:
    try:
        turn = ChatTurnRequest.model_validate(parse_json_object(body))
    except ValidationError as exc:
        raise Refusal(400, "invalid_request", describe_validation_error(exc)) from None
    if not turn.regenerate and not (turn.user_input and turn.user_input.strip()):
        raise Refusal(
            400, "invalid_request", "user_input: must be a non-empty string (or set regenerate)"
        )
    return turn


def parse_generation_overrides(body: bytes) -> GenerationOverrides:
    try:
        return GenerationOverrides.model_validate(parse_json_object(body))
    except ValidationError as exc:
        raise Refusal(400, "invalid_request", describe_validation_error(exc)) from None


def request_id_from(headers: Any) -> str:
    """The client's request id, or a fresh one. A malformed id is refused."""
    given = headers.get(REQUEST_ID_HEADER)
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID_RE.match(given):
        raise Refusal(
            400,
            "invalid_request",
            f"{REQUEST_ID_HEADER} must be 1-128 characters of letters, digits and . _ : -",
        )
    return given


def parse_feedback(data: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """A `POST /feedback` body: the answer's message id and the entry to store for it. (Whether
    the id names one of the session's answers is checked where the session changes.)"""
    message_id = data.get("message_id")
    rating = data.get("rating")
    comment = data.get("comment", "")
    if not isinstance(message_id, str) or not message_id:
        raise Refusal(400, "invalid_request", "message_id: must be a non-empty string")
    if rating not in ("good", "bad"):
        raise Refusal(400, "invalid_request", "rating: must be 'good' or 'bad'")
    if not isinstance(comment, str) or len(comment) > 2000:
        raise Refusal(
            400, "invalid_request", "comment: must be a string of at most 2000 characters"
        )
    return message_id, {"rating": rating, "comment": comment}
