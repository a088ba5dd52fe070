"""OpenAI function tools: parsing and validation of `tools`, `tool_choice`, assistant
`tool_calls` and `role: tool` messages, and the output constraint of a forced call.

Pure functions; a refusal is a `Refusal` (400 naming the field). Both request shapes are read:
Chat Completions nests a tool as `{"type": "function", "function": {name, description,
parameters, strict}}`, the Responses API flattens it (`{"type": "function", name, ...}`).

`tool_choice: required` (or a named function) is decoded under one JSON schema:
`{"name": <one of the tools>, "arguments": <that tool's parameters>}`, so the call is always
valid JSON matching its schema (see `forced_call_constraint`). `auto` is left to the model's
own words, parsed by `serve_app.openai_api.tool_calls`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.model_contract import OutputConstraint
from serve_app.refusals import invalid_request, unsupported_parameter

MAX_TOOLS = 128  # OpenAI's own limit
MAX_DESCRIPTION_CHARS = 4096
MAX_ARGUMENT_CHARS = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    """One function the model may call. `parameters_json` is the JSON schema, serialized so
    the tool stays hashable."""

    name: str
    description: str = ""
    parameters_json: str = '{"type": "object", "properties": {}}'

    @property
    def parameters(self) -> dict[str, Any]:
        return json.loads(self.parameters_json)


@dataclass(frozen=True)
class ToolChoice:
    """`none`, `auto`, `required`, or `function` (then `name` is the forced function)."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: its id, the function's name, its arguments as a JSON string
    (as OpenAI sends them)."""

    id: str
    name: str
    arguments: str


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise invalid_request(f"'{where}' must be an object", where, "invalid_type")
    return value


def _string(value: Any, where: str, *, max_chars: int, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise invalid_request(f"'{where}' must be a string", where, "invalid_type")
    if len(value) > max_chars:
        raise invalid_request(f"'{where}' is longer than {max_chars} characters", where)
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise invalid_request(
            f"'{where}' must be 1-64 letters, digits, '_' or '-' (got {value!r})", where
        )
    return value


def _tool(spec: Mapping[str, Any], where: str, *, flat: bool) -> Tool:
    kind = spec.get("type")
    if kind != "function":
        raise unsupported_parameter(
            f"{where}.type", f"is {kind!r}; only 'function' tools are supported"
        )
    body = spec if flat else _object(spec.get("function"), f"{where}.function")
    prefix = where if flat else f"{where}.function"
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    parameters = _object(parameters, f"{prefix}.parameters")
    if parameters.get("type", "object") != "object":
        raise invalid_request(
            f"'{prefix}.parameters' must be a JSON schema of type 'object'", f"{prefix}.parameters"
        )
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(f"'{prefix}.strict' must be a boolean", f"{prefix}.strict")
    return Tool(
        name=_name(body.get("name"), f"{prefix}.name"),
        description=_string(
            body.get("description"),
            f"{prefix}.description",
            max_chars=MAX_DESCRIPTION_CHARS,
            required=False,
        ),
        parameters_json=json.dumps(parameters, sort_keys=True),
    )


def parse_tools(raw: Any, *, flat: bool = False, where: str = "tools") -> tuple[Tool, ...]:
    """The request's `tools` (None or [] for none). `flat`: the Responses API's shape."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid_request(f"'{where}' must be an array", where, "invalid_type")
    if len(raw) > MAX_TOOLS:
        raise invalid_request(f"'{where}' allows at most {MAX_TOOLS} tools", where)
    tools = tuple(
        _tool(_object(spec, f"{where}[{i}]"), f"{where}[{i}]", flat=flat)
        for i, spec in enumerate(raw)
    )
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid_request(
                f"'{where}' names the function {name!r} twice", f"{where}[{i}].name"
            )
    return tools


def parse_tool_choice(
    raw: Any, tools: tuple[Tool, ...], *, flat: bool = False, where: str = "tool_choice"
) -> ToolChoice:
    """The request's `tool_choice`, checked against its tools. Absent means `auto` with tools,
    `none` without (OpenAI's defaults)."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise invalid_request(
                f"'{where}' must be 'none', 'auto', 'required' or a function", where
            )
        choice = ToolChoice(raw)  # type: ignore[arg-type]
    else:
        spec = _object(raw, where)
        if spec.get("type") != "function":
            raise unsupported_parameter(
                f"{where}.type", f"is {spec.get('type')!r}; only 'function' can be named"
            )
        if flat:
            name = _name(spec.get("name"), f"{where}.name")
        else:
            name = _name(
                _object(spec.get("function"), f"{where}.function").get("name"),
                f"{where}.function.name",
            )
        if name not in {t.name for t in tools}:
            raise invalid_request(f"'{where}' names {name!r}, which is not in 'tools'", where)
        choice = ToolChoice("function", name)
    if choice.mode == "required" and not tools:
        raise invalid_request(f"'{where}' is 'required' but no tools were given", where)
    return choice


def forced_call_schema(tools: tuple[Tool, ...], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema a forced call is decoded under: one object naming a function (`const`)
    and carrying arguments valid against that function's parameters."""
    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def forced_call_constraint(tools: tuple[Tool, ...], choice: ToolChoice) -> OutputConstraint | None:
    """The engine constraint for this choice: None unless a call is forced."""
    if not choice.forced:
        return None
    return OutputConstraint(
        kind="json_schema", schema_json=json.dumps(forced_call_schema(tools, choice))
    )


def parse_message_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` (history sent back by the client)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid_request(f"'{where}' must be an array", where, "invalid_type")
    calls = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        spec = _object(item, at)
        if spec.get("type", "function") != "function":
            raise unsupported_parameter(f"{at}.type", "only 'function' calls are supported")
        function = _object(spec.get("function"), f"{at}.function")
        calls.append(
            ToolCall(
                id=_string(spec.get("id"), f"{at}.id", max_chars=256),
                name=_name(function.get("name"), f"{at}.function.name"),
                arguments=_string(
                    function.get("arguments"),
                    f"{at}.function.arguments",
                    max_chars=MAX_ARGUMENT_CHARS,
                ),
            )
        )
    return tuple(calls)


def parse_text_format(raw: Any, where: str = "text.format") -> OutputConstraint | None:
    """The Responses API's `text.format` (or a Chat `response_format` in the same flat shape
    once unwrapped): `text` (None), `json_object`, or `json_schema` with its `schema`."""
    if raw is None:
        return None
    spec = _object(raw, where)
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(kind="json_object")
    if kind == "json_schema":
        _name(spec.get("name"), f"{where}.name")
        schema = _object(spec.get("schema"), f"{where}.schema")
        return OutputConstraint(kind="json_schema", schema_json=json.dumps(schema))
    raise invalid_request(
        f"'{where}.type' must be 'text', 'json_object' or 'json_schema'", f"{where}.type"
    )
