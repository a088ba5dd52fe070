"""The OpenAI chat-completions protocol as pure functions: request parsing, errors, response
objects, Server-Sent Events framing and stop sequences. No Ray, no engine, no I/O.

Design note
-----------
* `parse_chat_completion` turns a `/v1/chat/completions` body into a `ChatCompletionRequest`:
  plain `{role, content}` messages, generation parameters named as in
  `serve_app.config.GenerationParams` (and validated against that model's own ranges, so a
  limit has one definition), stop strings, `stream` and `include_usage`.
* Nothing that would change the answer is ignored. A parameter we cannot honour is refused
  with a 400 naming it (`error.param`), unless its value is the neutral one (`n: 1`,
  `logprobs: false`, `presence_penalty: 0`, `tools: []`, `null` for anything...): clients that
  send explicit defaults, or that echo a previous assistant message back with
  `tool_calls: null`, keep working. Parameters that cannot change the text (`user`,
  `metadata`, `store`, `service_tier`, `prompt_cache_key`, `stream_options.include_obfuscation`
  ...) are accepted and ignored. vLLM's `stream_options.continuous_usage_stats` is honoured
  (each chunk carries the usage so far); its `ignore_eos` passes only as `false`. Unknown
  parameters are refused (400, code `unknown_parameter`): we cannot know that they are
  harmless. `top_k` is accepted as an
  extension (as vLLM and TGI do; -1 means "off", like our 0).
* `stream_options` is accepted without `stream: true` and then ignored (OpenAI answers 400
  there; being lenient cannot change the answer and spares clients that always send it).
* `seed` is accepted only when the engine honours it (`seed_supported=True`); otherwise 400.
* Text parts of an array `content` are joined with "\\n" (as vLLM does); other part types
  (images, audio, files) are refused naming `messages[i].content[j].type`. `developer`
  messages are system messages; `tool` and `function` messages are refused.
* `OpenAIHTTPError` is the one exception type for every refusal: status, the OpenAI error
  body, and headers (`Retry-After` and `retry-after-ms` on a 429: the SDKs honour either and
  prefer the second, which is exact). `from_rejection` converts the request path's own
  `RequestRejected` (e.g. 413 prompt_too_long, 429 too_many_requests, 503 store errors).
* Builders return plain dicts in the shapes of the `openai` SDK's `ChatCompletionChunk`,
  `ChatCompletion` and `Model` (checked by tests against the SDK's pydantic types). A stream is:
  first chunk (role, and best also the first text), text chunks, a final chunk with an empty
  delta and `finish_reason`, the usage chunk if asked for, then `data: [DONE]`.
* `StopMatcher` cuts the answer at the first stop string to complete, however the text is
  chunked: it holds back a tail that could still become a stop string and releases it when it
  cannot (or at `flush()` when the answer ends).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError
from starlette.responses import JSONResponse

from serve_app.config import GenerationParams
from serve_app.validation import MAX_JSON_DEPTH, json_depth_exceeds

MAX_MESSAGES = 2048
MAX_CONTENT_CHARS = 1_000_000  # all messages together; the context check comes later
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512
MAX_USER_CHARS = 512
OWNED_BY = "chatstream"

# Parameters we honour (mapped below), those that cannot change the answer, and those we cannot
# honour unless they carry their neutral value (compared with ==, after None is accepted).
_SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "stop", "seed", "user",
}  # fmt: skip
_HARMLESS = {
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "parallel_tool_calls", "prompt_cache_options",
}  # fmt: skip
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "moderation": (),
    "ignore_eos": (False,),  # vLLM's extension; true would generate past the end of the answer
}
_STREAM_OPTIONS_HARMLESS = {"include_obfuscation"}
_STREAM_OPTIONS_NEUTRAL: dict[str, tuple[Any, ...]] = {}
_MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tool_calls": ([],),
    "function_call": (),
    "refusal": (),
    "annotations": ([],),
    "audio": (),
    "name": (),
    "tool_call_id": (),
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STRICT = ConfigDict(strict=True)


def _param_adapter(name: str) -> TypeAdapter:
    """A validator for one GenerationParams field: its type and its ranges (one definition)."""
    info = GenerationParams.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)], config=_STRICT)


_PARAM_ADAPTERS = {name: _param_adapter(name) for name in GenerationParams.model_fields}


# ---------------------------------------------------------------------------------- errors
class OpenAIHTTPError(Exception):
    """A refusal in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    @property
    def reason(self) -> str:
        """A short machine reason, for the rejection ledger and metrics."""
        return self.code or self.type

    @property
    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)

    def sse(self) -> str:
        """The error as an SSE event, for a failure after the stream started (the SDKs raise
        `APIError` on it)."""
        return sse_event(self.body)


def invalid_request(
    message: str, param: str | None = None, code: str = "invalid_value"
) -> OpenAIHTTPError:
    return OpenAIHTTPError(400, message, type="invalid_request_error", code=code, param=param)


def unsupported_parameter(
    param: str, why: str = "is not supported by this server"
) -> OpenAIHTTPError:
    return invalid_request(f"'{param}' {why}", param, "unsupported_parameter")


def authentication_error(message: str = "a valid API key is required") -> OpenAIHTTPError:
    return OpenAIHTTPError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str, served: str) -> OpenAIHTTPError:
    return OpenAIHTTPError(
        404,
        f"The model '{model}' does not exist; this server serves '{served}'",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (RFC 9110; rounded up, at least 1) and the exact delay
    in `retry-after-ms`, which the openai SDKs prefer."""
    seconds = max(0.0, seconds)
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def rate_limited(message: str, retry_after_s: float, code: str) -> OpenAIHTTPError:
    return OpenAIHTTPError(
        429, message, type="rate_limit_error", code=code, headers=retry_after_headers(retry_after_s)
    )


def service_unavailable(
    message: str = "the session store is unavailable; retry later",
    retry_after_s: float = 1.0,
    code: str = "store_unavailable",
) -> OpenAIHTTPError:
    return OpenAIHTTPError(
        503,
        message,
        type="service_unavailable_error",
        code=code,
        headers=retry_after_headers(retry_after_s),
    )


def server_error(message: str = "generation failed; see server logs") -> OpenAIHTTPError:
    return OpenAIHTTPError(500, message, type="server_error", code="unknown_error_occurred")


def from_rejection(rejected: Any) -> OpenAIHTTPError:
    """Convert the request path's `RequestRejected` (status_code, error, message, headers)."""
    status, reason, message = rejected.status_code, rejected.error, rejected.message
    headers = dict(getattr(rejected, "headers", None) or {})
    if reason == "prompt_too_long":
        return invalid_request(message, "messages", "context_length_exceeded")
    if status == 429:
        if "retry-after-ms" not in {k.lower() for k in headers}:
            seconds = float(headers.get("Retry-After", headers.get("retry-after", 1)) or 1)
            headers = {**headers, **retry_after_headers(seconds)}
        return OpenAIHTTPError(429, message, type="rate_limit_error", code=reason, headers=headers)
    if status == 503:
        return OpenAIHTTPError(
            503, message, type="service_unavailable_error", code=reason, headers=headers
        )
    if status >= 500:
        return OpenAIHTTPError(status, message, type="server_error", code=reason, headers=headers)
    return OpenAIHTTPError(
        status if status in (400, 401, 404, 413, 431) else 400,
        message,
        type="invalid_request_error",
        code=reason,
        headers=headers,
    )


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class ChatCompletionRequest:
    """A valid `/v1/chat/completions` request in ChatStream's terms."""

    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)  # only what the client set
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats
    seed: int | None = None
    user: str | None = None

    def generation_params(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """`defaults` (GenerationParams names) overridden by the client's parameters. The
        route still caps `max_new_tokens` to what the context leaves after the prompt."""
        return {**defaults, **self.params}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _load_body(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(body, Mapping):
        return dict(body)
    try:
        data = json.loads(body or b"", parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(f"the body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        data = None  # deeper than Python's parser goes: refused just below
    if data is None or json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise invalid_request(
            f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    if not isinstance(data, dict):
        raise invalid_request("the body must be a JSON object", code="invalid_json")
    return data


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    # bool is an int: `n: true` must not pass as `n: 1`, nor `logprobs: 0` as `false`.
    return any(type(value) is type(n) and value == n for n in neutral) or (
        isinstance(value, float) and any(type(n) is int and value == n for n in neutral)
    )


def _check_keys(
    data: Mapping[str, Any],
    supported: set[str],
    harmless: set[str],
    neutral: Mapping[str, tuple[Any, ...]],
    prefix: str = "",
) -> None:
    for key, value in data.items():
        if key in supported or key in harmless:
            continue
        name = f"{prefix}{key}"
        if key in neutral:
            if not _is_neutral(value, neutral[key]):
                raise unsupported_parameter(name)
            continue
        raise invalid_request(
            f"Unrecognized request argument supplied: {name}", name, "unknown_parameter"
        )


def _validate_param(name: str, param: str, value: Any) -> Any:
    try:
        return _PARAM_ADAPTERS[name].validate_python(value)
    except ValidationError as exc:
        raise invalid_request(
            f"'{param}': {exc.errors()[0]['msg']} (got {value!r})", param
        ) from None


def _strict_bool(data: Mapping[str, Any], key: str, param: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_request(f"'{param}' must be a boolean", param, "invalid_type")
    return value


def _parse_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise invalid_request(
                    f"'{where}[{j}]' must be an object", f"{where}[{j}]", "invalid_type"
                )
            kind = part.get("type")
            if kind != "text":
                raise unsupported_parameter(
                    f"{where}[{j}].type", f"is {kind!r}; only 'text' content parts are supported"
                )
            extra = set(part) - {"type", "text"}
            if extra:
                raise unsupported_parameter(f"{where}[{j}].{sorted(extra)[0]}")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_request(
                    f"'{where}[{j}].text' must be a string", f"{where}[{j}].text", "invalid_type"
                )
            texts.append(text)
        return "\n".join(texts)
    raise invalid_request(
        f"'{where}' must be a string or an array of text parts", where, "invalid_type"
    )


def _parse_messages(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        raise invalid_request("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise invalid_request("'messages' must be a non-empty array", "messages", "invalid_type")
    if len(raw) > MAX_MESSAGES:
        raise invalid_request(f"'messages' has more than {MAX_MESSAGES} entries", "messages")
    messages, total = [], 0
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid_request(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            if role in ("tool", "function"):
                raise unsupported_parameter(
                    f"{where}.role", f"is {role!r}; tools are not supported"
                )
            raise invalid_request(
                f"'{where}.role' must be one of {sorted(_ROLES)}", f"{where}.role"
            )
        _check_keys(message, {"role", "content"}, set(), _MESSAGE_NEUTRAL, f"{where}.")
        content = message.get("content")
        if content is None and role != "assistant":
            raise invalid_request(
                f"'{where}.content' is required", f"{where}.content", "missing_required_parameter"
            )
        text = "" if content is None else _parse_content(content, f"{where}.content")
        total += len(text)
        if total > MAX_CONTENT_CHARS:
            raise invalid_request(
                f"the messages are longer than {MAX_CONTENT_CHARS} characters", "messages"
            )
        messages.append({"role": _ROLES[role], "content": text})
    return messages


def _parse_stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid_request(
            "'stop' must be a string or an array of strings", "stop", "invalid_type"
        )
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid_request(f"'stop' allows at most {MAX_STOP_SEQUENCES} sequences", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid_request(f"each 'stop' sequence must be 1-{MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(stops))


def parse_chat_completion(
    body: bytes | str | Mapping[str, Any],
    *,
    served_model: str,
    seed_supported: bool = False,
) -> ChatCompletionRequest:
    """Validate a `/v1/chat/completions` body. Raises `OpenAIHTTPError` (400, or 404 for a
    model other than `served_model`)."""
    data = _load_body(body)
    _check_keys(data, _SUPPORTED, _HARMLESS, _NEUTRAL)

    model = data.get("model")
    if model is None:
        raise invalid_request("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_request("'model' must be a string", "model", "invalid_type")
    if model != served_model:
        raise model_not_found(model, served_model)
    messages = _parse_messages(data.get("messages"))

    stream = _strict_bool(data, "stream", "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "'stream_options' must be an object", "stream_options", "invalid_type"
        )
    options = options or {}
    _check_keys(
        options, {"include_usage", "continuous_usage_stats"}, _STREAM_OPTIONS_HARMLESS,
        _STREAM_OPTIONS_NEUTRAL,
        "stream_options.",
    )  # fmt: skip
    include_usage = stream and _strict_bool(
        options, "include_usage", "stream_options.include_usage"
    )
    continuous_usage = include_usage and _strict_bool(
        options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
    )

    params: dict[str, Any] = {}
    for param, name in (("temperature", "temperature"), ("top_p", "top_p")):
        if data.get(param) is not None:
            params[name] = _validate_param(name, param, data[param])
    if data.get("top_k") is not None:
        top_k = data["top_k"]
        params["top_k"] = 0 if top_k == -1 and type(top_k) is int else top_k
        params["top_k"] = _validate_param("top_k", "top_k", params["top_k"])
    max_tokens, max_completion = data.get("max_tokens"), data.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid_request(
            "'max_tokens' and 'max_completion_tokens' disagree; send one of them", "max_tokens"
        )
    if max_completion is not None:
        params["max_new_tokens"] = _validate_param(
            "max_new_tokens", "max_completion_tokens", max_completion
        )
    elif max_tokens is not None:
        params["max_new_tokens"] = _validate_param("max_new_tokens", "max_tokens", max_tokens)

    seed = data.get("seed")
    if seed is not None:
        if not seed_supported:
            raise unsupported_parameter("seed", "is not supported by this server's engine")
        if type(seed) is not int or not -(2**63) <= seed < 2**63:
            raise invalid_request("'seed' must be a 64-bit integer", "seed", "invalid_type")

    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise invalid_request(
            f"'user' must be a string of at most {MAX_USER_CHARS} characters", "user"
        )

    return ChatCompletionRequest(
        model=model,
        messages=messages,
        params=params,
        stop=_parse_stop(data.get("stop")),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        seed=seed,
        user=user,
    )


# ---------------------------------------------------------------------------------- responses
def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(*, stopped: bool, completion_tokens: int, max_new_tokens: int) -> str:
    """`stop` for the end of the answer or a stop string, `length` when the token budget ran
    out first."""
    return "length" if not stopped and completion_tokens >= max_new_tokens else "stop"


@dataclass(frozen=True)
class ChunkBuilder:
    """The `chat.completion.chunk` objects of one streamed answer (one id, one timestamp)."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None  # every chunk but the usage chunk carries `usage: null`
        chunk.update(extra)
        return chunk

    def delta(self, content: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """A text chunk; the `first` one also carries `role: assistant`."""
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["content"] = content if content is not None or not first else ""
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: str) -> dict[str, Any]:
        """The last choice chunk: empty delta, `finish_reason` stop|length."""
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The usage chunk (no choices), sent after `finish` when `include_usage`."""
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))


def chat_completion(
    *,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A non-streamed `chat.completion` with `usage`."""
    return {
        "id": id or new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def model_list(served_model: str, created: int | None = None) -> dict[str, Any]:
    """The body of `GET /v1/models`."""
    return {
        "object": "list",
        "data": [
            {
                "id": served_model,
                "object": "model",
                "created": int(time.time()) if created is None else created,
                "owned_by": OWNED_BY,
            }
        ],
    }


SSE_DONE = "data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"
# Headers for the SSE response: no caching, and no buffering by nginx-style proxies.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(obj: Mapping[str, Any]) -> str:
    """One Server-Sent Event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------- stop strings
class StopMatcher:
    """Cuts streamed text at the first stop string to complete.

    `feed(text)` returns what may be sent now; a tail that could still grow into a stop string
    is held back. Once a stop string completes, `stopped` is True, the text before it is
    returned, and everything after is dropped (the route should then cancel the generation).
    `flush()` returns the held-back tail when the answer ends without a stop. The result does
    not depend on how the text is chunked: the stop string that completes first (at the
    earliest character) wins, as if the text arrived one character at a time.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        best: tuple[int, int] | None = None  # (end, start) of the earliest completed stop
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            self.stopped, self._held = True, ""
            return buffer[: best[1]]
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def _partial_stop_length(self, buffer: str) -> int:
        """The longest tail of `buffer` that is a proper prefix of some stop string. Only
        tails starting with a stop string's first character are compared."""
        best = 0
        for stop in self.stops:
            start = max(0, len(buffer) - len(stop) + 1)
            while (start := buffer.find(stop[0], start)) >= 0 and len(buffer) - start > best:
                if stop.startswith(buffer[start:]):
                    best = len(buffer) - start
                    break
                start += 1
        return best

    def flush(self) -> str:
        """The held-back tail, at the end of an answer that met no stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @property
    def held(self) -> str:
        return self._held


# ---------------------------------------------------------------------------------- SSE stream
class StreamEncoder:
    """The SSE text of one streamed answer, from the engine's text chunks.

    `feed(text)` returns what to send now ("" when nothing: send nothing, it is no chunk);
    the first text goes out with `role: assistant`. Check `stopped` after each feed: a stop
    string completed, so cancel the generation and `end()`. `end()` returns the rest: the
    held-back text, the `finish_reason` chunk, the usage chunk if asked for, `data: [DONE]`.
    """

    def __init__(
        self,
        request: ChatCompletionRequest,
        builder: ChunkBuilder | None = None,
        *,
        prompt_tokens: int = 0,
        count_tokens: Callable[[str], int] | None = None,
    ):
        self.builder = builder or ChunkBuilder(request.model, include_usage=request.include_usage)
        self.include_usage = request.include_usage
        # Continuous usage (vLLM's extension): each text chunk carries the usage so far.
        self.prompt_tokens = prompt_tokens
        self.count_tokens = count_tokens if request.continuous_usage else None
        self.matcher = StopMatcher(request.stop)
        self.text: list[str] = []  # the answer as sent
        self._started = False

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def _delta(self, text: str) -> str:
        if not text and self._started:
            return ""
        self.text.append(text)
        chunk = self.builder.delta(text, first=not self._started)
        if self.count_tokens is not None:
            chunk["usage"] = usage(self.prompt_tokens, self.count_tokens("".join(self.text)))
        self._started = True
        return sse_event(chunk)

    def feed(self, text: str) -> str:
        sendable = self.matcher.feed(text)
        return self._delta(sendable) if sendable else ""

    def end(self, *, prompt_tokens: int, completion_tokens: int, max_new_tokens: int) -> str:
        """Everything after the last text. `completion_tokens`: tokens the engine generated
        (a stop string may have dropped some of them from the text)."""
        reason = finish_reason(
            stopped=self.stopped,
            completion_tokens=completion_tokens,
            max_new_tokens=max_new_tokens,
        )
        finish = self.builder.finish(reason)
        if self.count_tokens is not None:
            finish["usage"] = usage(prompt_tokens, completion_tokens)
        events = [self._delta(self.matcher.flush()), sse_event(finish)]
        if self.include_usage:
            events.append(sse_event(self.builder.usage(prompt_tokens, completion_tokens)))
        events.append(SSE_DONE)
        return "".join(events)
