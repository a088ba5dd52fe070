"""`/v1/chat/completions` requests: parsing and validation, as pure functions.

`parse_chat_completion` turns a body into a `ChatCompletionRequest`: plain `{role, content}`
messages, generation parameters named as in `serve_app.config.GenerationParams` (and validated
against that model's own ranges, so a limit has one definition), stop strings, `seed`,
`stream` and `include_usage`. A refusal is a `Refusal` in OpenAI's terms (400, or 404 for
another model).

* Nothing that would change the answer is ignored. A parameter we cannot honour is refused
  with a 400 naming it (`error.param`), unless its value is the neutral one (`n: 1`,
  `logprobs: false`, `presence_penalty: 0`, `tools: []`, `null` for anything...): clients that
  send explicit defaults, or that echo a previous assistant message back with
  `tool_calls: null`, keep working. Parameters that cannot change the text (`user`,
  `metadata`, `store`, `service_tier`, `prompt_cache_key`, `stream_options.include_obfuscation`
  ...) are accepted and ignored. vLLM's `stream_options.continuous_usage_stats` is honoured
  (each chunk carries the usage so far); its `ignore_eos` passes only as `false`. Unknown
  parameters are refused (400, code `unknown_parameter`): we cannot know that they are
  harmless. `top_k` is accepted as an extension (as vLLM and TGI do; -1 means "off", like
  our 0).
* `stream_options` is accepted without `stream: true` and then ignored (OpenAI answers 400
  there; being lenient cannot change the answer and spares clients that always send it).
* `seed` makes sampling reproducible per request (every engine honours it).
* Text parts of an array `content` are joined with "\\n" (as vLLM does); other part types
  (images, audio, files) are refused naming `messages[i].content[j].type`. `developer`
  messages are system messages; `function` messages are refused. `tools`, `tool_choice`,
  assistant `tool_calls` and `tool` messages are read by tools.py and rendered into the prompt
  as text by tool_calls.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from serve_app.config import GenerationParams
from serve_app.openai_api.tool_calls import render_assistant_calls, render_tool_result
from serve_app.openai_api.tools import (
    Tool,
    ToolChoice,
    parse_message_tool_calls,
    parse_tool_choice,
    parse_tools,
)
from serve_app.refusals import invalid_request, model_not_found, unsupported_parameter
from serve_app.validation import MAX_JSON_DEPTH, json_depth_exceeds, whole_number

MAX_MESSAGES = 2048
MAX_CONTENT_CHARS = 1_000_000  # all messages together; the context check comes later
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512
MAX_USER_CHARS = 512

# Parameters we honour (mapped below), those that cannot change the answer, and those we cannot
# honour unless they carry their neutral value (compared with ==, after None is accepted).
_SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "stop", "seed", "user", "tools", "tool_choice",
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
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STRICT = ConfigDict(strict=True)


def _param_adapter(name: str) -> TypeAdapter:
    """A validator for one GenerationParams field: its type and its ranges (one definition)."""
    info = GenerationParams.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)], config=_STRICT)


_PARAM_ADAPTERS = {name: _param_adapter(name) for name in GenerationParams.model_fields}


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")

    def generation_params(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """`defaults` (GenerationParams names) overridden by the client's parameters."""
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
        return _PARAM_ADAPTERS[name].validate_python(whole_number(value))
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
        if role == "tool":  # a tool's result, rendered as text (tool_calls.py)
            _check_keys(message, {"role", "content", "tool_call_id"}, set(), {}, f"{where}.")
            content = message.get("content")
            text = "" if content is None else _parse_content(content, f"{where}.content")
            total += len(text)
            messages.append(render_tool_result(text))
            continue
        if not isinstance(role, str) or role not in ROLES:
            if role == "function":
                raise unsupported_parameter(
                    f"{where}.role", "is 'function' (deprecated); send 'tool' messages"
                )
            raise invalid_request(f"'{where}.role' must be one of {sorted(ROLES)}", f"{where}.role")
        own = {"role", "content", "tool_calls"} if role == "assistant" else {"role", "content"}
        _check_keys(message, own, set(), _MESSAGE_NEUTRAL, f"{where}.")
        content = message.get("content")
        if content is None and role != "assistant":
            raise invalid_request(
                f"'{where}.content' is required", f"{where}.content", "missing_required_parameter"
            )
        text = "" if content is None else _parse_content(content, f"{where}.content")
        if role == "assistant" and message.get("tool_calls"):
            calls = parse_message_tool_calls(message["tool_calls"], f"{where}.tool_calls")
            text = render_assistant_calls(text, calls)
        total += len(text)
        if total > MAX_CONTENT_CHARS:
            raise invalid_request(
                f"the messages are longer than {MAX_CONTENT_CHARS} characters", "messages"
            )
        messages.append({"role": ROLES[role], "content": text})
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


def check_model(data: Mapping[str, Any], served_model: str) -> str:
    """The body's `model`: required, and the served one (404 else)."""
    model = data.get("model")
    if model is None:
        raise invalid_request("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_request("'model' must be a string", "model", "invalid_type")
    if model != served_model:
        raise model_not_found(model, served_model)
    return model


def parse_chat_completion(
    body: bytes | str | Mapping[str, Any],
    *,
    served_model: str,
) -> ChatCompletionRequest:
    """Validate a `/v1/chat/completions` body. Raises `Refusal` (400, or 404 for a model other
    than `served_model`)."""
    data = _load_body(body)
    _check_keys(data, _SUPPORTED, _HARMLESS, _NEUTRAL)
    model = check_model(data, served_model)
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
    # Both are checked whatever their use: a malformed value is refused, not skipped.
    asked_usage = _strict_bool(options, "include_usage", "stream_options.include_usage")
    asked_continuous = _strict_bool(
        options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
    )
    include_usage = stream and asked_usage
    continuous_usage = include_usage and asked_continuous

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
    if seed is not None and (type(seed) is not int or not -(2**63) <= seed < 2**63):
        raise invalid_request("'seed' must be a 64-bit integer", "seed", "invalid_type")

    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise invalid_request(
            f"'user' must be a string of at most {MAX_USER_CHARS} characters", "user"
        )

    tools = parse_tools(data.get("tools"))
    return ChatCompletionRequest(
        tools=tools,
        tool_choice=parse_tool_choice(data.get("tool_choice"), tools),
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
