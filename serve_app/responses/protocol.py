"""`POST /v1/responses` requests: parsing and validation, as pure functions.

`parse_response_request` turns a body into a `ResponseRequest`, by the rules of
`/v1/chat/completions` (serve_app/openai_api/protocol.py, whose checks it reuses): what would
change the answer and cannot be honoured is refused with a 400 naming it, unless its value is
the neutral one; what cannot change the text is accepted and ignored; unknown fields are
refused. `text.format` (`json_object`, `json_schema`) becomes the request's OutputConstraint
(openai_api/tools.py); function `tools` and `tool_choice` are read in the flat Responses shape,
and a forced call's constraint replaces it (both at once: a 400 naming `tool_choice`).

`input` is a string (one user message) or a list of items: messages (`type: "message"` or no
type; roles user, system, developer, assistant; content a string or `input_text` /
`output_text` parts), `function_call` (a call the model made, echoed back) and
`function_call_output` (its result), rendered as chat renders assistant `tool_calls` and
`role: tool` messages (responses/tool_items.py). Other item types (images, files, item
references) are refused naming `input[i].type` or `input[i].content[j].type`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.model_contract import OutputConstraint
from serve_app.openai_api.protocol import (
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    MAX_USER_CHARS,
    ROLES,
    _check_keys,
    _load_body,
    _validate_param,
    check_model,
    strict_bool,
)
from serve_app.openai_api.tools import (
    MAX_ARGUMENT_CHARS,
    Tool,
    ToolCall,
    ToolChoice,
    _name,
    _string,
    forced_call_constraint,
    parse_text_format,
    parse_tool_choice,
    parse_tools,
)
from serve_app.refusals import Refusal, invalid_request, unsupported_parameter
from serve_app.responses.tool_items import render_calls, render_output

MAX_INSTRUCTIONS_CHARS = 100_000
MAX_METADATA_KEYS = 16
RESPONSE_ID = re.compile(r"resp_([0-9a-f]{32})([0-9a-f]{32})")

_SUPPORTED = {
    "model", "input", "instructions", "stream", "stream_options", "store",
    "previous_response_id", "temperature", "top_p", "top_k", "max_output_tokens", "seed",
    "metadata", "user", "text", "tools", "tool_choice",
}  # fmt: skip
_HARMLESS = {
    "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "parallel_tool_calls", "max_tool_calls",
}  # fmt: skip
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "include": ([],),
    "reasoning": (),
    "background": (False,),
    "conversation": (),
    "prompt": (),
    "truncation": ("auto",),  # the oldest turns of a chain give way to the context
    "top_logprobs": (0,),
}
_TEXT_NEUTRAL: dict[str, tuple[Any, ...]] = {"verbosity": ()}
_ITEM_HARMLESS = {"type", "id", "status", "phase"}
_PART_TYPES = {"input_text", "output_text", "text"}


@dataclass(frozen=True)
class ResponseRequest:
    """A valid `POST /v1/responses` request in ChatStream's terms."""

    model: str
    messages: list[dict[str, str]]  # the new input, as plain {role, content} messages
    instructions: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # GenerationParams names; as sent
    seed: int | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    constraint: OutputConstraint | None = None  # from text.format or a forced call
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")


def response_id(chain: str, message_id: str) -> str:
    """A response's id: its chain (the session record it lives in) and its answer's id."""
    return f"resp_{chain}{message_id}"


def split_response_id(value: str) -> tuple[str, str] | None:
    """(chain, message id) of a response id, or None if it is not one of ours."""
    match = RESPONSE_ID.fullmatch(value)
    return (match.group(1), match.group(2)) if match else None


def response_not_found(value: str, param: str | None = None) -> Refusal:
    return Refusal(
        404, "not_found", f"Response with id '{value}' not found.", param=param,
        error_type="invalid_request_error",
    )  # fmt: skip


def _parse_part(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise invalid_request(f"'{where}' must be an object", where, "invalid_type")
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in _PART_TYPES:
        raise unsupported_parameter(
            f"{where}.type", f"is {kind!r}; only 'input_text' and 'output_text' are supported"
        )
    _check_keys(part, {"type", "text"}, set(), {"annotations": ([],), "logprobs": ([],)},
                f"{where}.")  # fmt: skip
    text = part.get("text")
    if not isinstance(text, str):
        raise invalid_request(f"'{where}.text' must be a string", f"{where}.text", "invalid_type")
    return text


def _text_or_parts(value: Any, where: str) -> str:
    """A string, or an array of text parts joined by newlines; else a 400 naming `where`."""
    if isinstance(value, list):
        value = "\n".join(_parse_part(p, f"{where}[{j}]") for j, p in enumerate(value))
    if not isinstance(value, str):
        raise invalid_request(
            f"'{where}' must be a string or an array of text parts", where, "invalid_type"
        )
    return value


def _parse_call(item: dict[str, Any], where: str) -> ToolCall:
    _check_keys(item, {"call_id", "name", "arguments"}, _ITEM_HARMLESS, {}, f"{where}.")
    return ToolCall(
        id=_string(item.get("call_id"), f"{where}.call_id", max_chars=256),
        name=_name(item.get("name"), f"{where}.name"),
        arguments=_string(item.get("arguments"), f"{where}.arguments",
                          max_chars=MAX_ARGUMENT_CHARS),
    )  # fmt: skip


def _parse_output(item: dict[str, Any], where: str) -> str:
    _check_keys(item, {"call_id", "output"}, _ITEM_HARMLESS, {}, f"{where}.")
    _string(item.get("call_id"), f"{where}.call_id", max_chars=256)
    return render_output(_text_or_parts(item.get("output"), f"{where}.output"))


def _parse_item(item: Any, where: str, messages: list[dict[str, str]]) -> dict[str, str]:
    """The message `item` adds to `messages` (a call or a result may join the last one)."""
    if not isinstance(item, dict):
        raise invalid_request(f"'{where}' must be an object", where, "invalid_type")
    kind = item.get("type", "message")
    last = messages[-1] if messages else None
    if kind == "function_call":
        previous = messages.pop() if last and last["role"] == "assistant" else None
        return render_calls(previous, [_parse_call(item, where)])
    if kind == "function_call_output":
        result = _parse_output(item, where)
        if last and last["role"] == "user" and last["content"].endswith("</tool_response>"):
            result = f"{messages.pop()['content']}\n{result}"
        return {"role": "user", "content": result}
    if kind != "message":
        raise unsupported_parameter(
            f"{where}.type",
            f"is {kind!r}; only messages, function_call and function_call_output are supported",
        )
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise invalid_request(f"'{where}.role' must be one of {sorted(ROLES)}", f"{where}.role")
    _check_keys(item, {"role", "content"}, _ITEM_HARMLESS, {}, f"{where}.")
    return {"role": ROLES[role], "content": _text_or_parts(item.get("content"), f"{where}.content")}


def parse_input(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        raise invalid_request("'input' is required", "input", "missing_required_parameter")
    if isinstance(raw, str):
        messages = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and raw:
        if len(raw) > MAX_MESSAGES:
            raise invalid_request(f"'input' has more than {MAX_MESSAGES} items", "input")
        messages = []
        for i, item in enumerate(raw):
            messages.append(_parse_item(item, f"input[{i}]", messages))
    else:
        raise invalid_request(
            "'input' must be a string or a non-empty array of messages", "input", "invalid_type"
        )
    if sum(len(m["content"]) for m in messages) > MAX_CONTENT_CHARS:
        raise invalid_request(f"'input' is longer than {MAX_CONTENT_CHARS} characters", "input")
    return messages


def _optional_str(data: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > limit):
        raise invalid_request(f"'{key}' must be a string of at most {limit} characters", key)
    return value


def _parse_metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, dict)
        or len(raw) > MAX_METADATA_KEYS
        or not all(isinstance(k, str) and len(k) <= 64 for k in raw)
        or not all(isinstance(v, str) and len(v) <= 512 for v in raw.values())
    ):
        raise invalid_request(
            f"'metadata' must map at most {MAX_METADATA_KEYS} keys (64 characters) to strings "
            "(512 characters)",
            "metadata",
        )
    return dict(raw)


def parse_response_request(
    body: bytes | str | Mapping[str, Any], *, served_model: str
) -> ResponseRequest:
    """Validate a `POST /v1/responses` body. Raises `Refusal` (400; 404 for another model)."""
    data = _load_body(body)
    _check_keys(data, _SUPPORTED, _HARMLESS, _NEUTRAL)
    model = check_model(data, served_model)
    messages = parse_input(data.get("input"))

    text = data.get("text")
    constraint = None
    if text is not None:
        if not isinstance(text, dict):
            raise invalid_request("'text' must be an object", "text", "invalid_type")
        _check_keys(text, {"format"}, set(), _TEXT_NEUTRAL, "text.")
        constraint = parse_text_format(text.get("format"))
    tools = parse_tools(data.get("tools"), flat=True)
    choice = parse_tool_choice(data.get("tool_choice"), tools, flat=True)
    if choice.forced:
        if constraint is not None:
            raise unsupported_parameter(
                "tool_choice", "cannot force a call and a 'text.format' at once"
            )
        constraint = forced_call_constraint(tools, choice)
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_request(
                "'stream_options' must be an object", "stream_options", "invalid_type"
            )
        _check_keys(options, set(), {"include_obfuscation"}, {}, "stream_options.")

    params: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            params[name] = _validate_param(name, name, data[name])
    if data.get("top_k") is not None:
        top_k = data["top_k"]
        top_k = 0 if top_k == -1 and type(top_k) is int else top_k
        params["top_k"] = _validate_param("top_k", "top_k", top_k)
    if data.get("max_output_tokens") is not None:
        params["max_new_tokens"] = _validate_param(
            "max_new_tokens", "max_output_tokens", data["max_output_tokens"]
        )
    seed = data.get("seed")
    if seed is not None and (type(seed) is not int or not -(2**63) <= seed < 2**63):
        raise invalid_request("'seed' must be a 64-bit integer", "seed", "invalid_type")
    _optional_str(data, "user", MAX_USER_CHARS)
    previous = _optional_str(data, "previous_response_id", 128)
    store = data.get("store")
    return ResponseRequest(
        model=model,
        messages=messages,
        instructions=_optional_str(data, "instructions", MAX_INSTRUCTIONS_CHARS),
        params=params,
        seed=seed,
        stream=strict_bool(data, "stream", "stream"),
        store=True if store is None else strict_bool(data, "store", "store"),
        previous_response_id=previous,
        metadata=_parse_metadata(data.get("metadata")),
        constraint=constraint,
        tools=tools,
        tool_choice=choice,
    )
