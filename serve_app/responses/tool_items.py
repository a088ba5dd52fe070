"""Function tools in `/v1/responses` answers, as pure functions: the `tools` / `tool_choice`
of a response object, its `function_call` output items, and the input items a client sends
back (`function_call`, `function_call_output`) as the messages the model reads.

The model's answer is kept as it was written (a stored answer is the raw text): under `auto`
its `<tool_call>` blocks become `function_call` items, under a forced choice the whole answer
is one call decoded under its schema (openai_api/tool_calls.py). A call's id is made from the
response's id and its place, so a retrieved response shows the ids the client first got.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from serve_app.openai_api.tool_calls import (
    extract_tool_calls,
    function_call_item,
    parse_forced_call,
    render_assistant_calls,
)
from serve_app.openai_api.tools import Tool, ToolCall, ToolChoice


def tools_meta(tools: tuple[Tool, ...], choice: ToolChoice) -> dict[str, Any]:
    """What a stored answer keeps of its request's tools (to show and re-read it)."""
    return {
        "tools": [
            {"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in tools
        ],
        "tool_choice": {"mode": choice.mode, "name": choice.name},
    }


def tools_from_meta(meta: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice]:
    tools = tuple(
        Tool(t["name"], t["description"], json.dumps(t["parameters"], sort_keys=True))
        for t in meta.get("tools") or ()
    )
    choice = meta.get("tool_choice") or {"mode": "none", "name": None}
    return tools, ToolChoice(choice["mode"], choice["name"])


def tool_fields(tools: tuple[Tool, ...], choice: ToolChoice) -> dict[str, Any]:
    """A response object's `tools` and `tool_choice`, in the Responses API's flat shape."""
    wire_choice: Any = choice.mode
    if choice.mode == "function":
        wire_choice = {"type": "function", "name": choice.name}
    return {
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description or None,
                "parameters": t.parameters,
                "strict": False,
            }
            for t in tools
        ],  # fmt: skip
        "tool_choice": wire_choice,
        # an `auto` answer may hold several `<tool_call>` blocks; a forced one is one call
        "parallel_tool_calls": choice.mode == "auto" and bool(tools),
    }


def numbered(call: ToolCall, response_id: str, index: int) -> ToolCall:
    """`call` with the id of its place in the response (stable across retrievals)."""
    return dataclasses.replace(call, id=f"call_{response_id[-24:]}{index:02d}")


def split_answer(
    text: str, tools: tuple[Tool, ...], choice: ToolChoice, response_id: str
) -> tuple[str, list[ToolCall]]:
    """A whole answer's text (what is not a call) and its calls, numbered."""
    if choice.forced:
        call = parse_forced_call(text, tools)
        calls = [call] if call else []
        text = "" if call else text
    elif choice.mode == "auto" and tools:
        text, found = extract_tool_calls(text, tools)
        calls = list(found)
    else:
        calls = []
    return text, [numbered(c, response_id, i) for i, c in enumerate(calls)]


def call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    """A `function_call` output item (`status` in_progress while its arguments stream)."""
    item = function_call_item(call)
    item["status"] = status
    if status == "in_progress":
        item["arguments"] = ""
    return item


def render_calls(previous: dict[str, str] | None, calls: list[ToolCall]) -> dict[str, str]:
    """Input `function_call` items as the assistant turn that made them (joined to the
    assistant message just before them, if any)."""
    content = previous["content"] if previous else ""
    return {"role": "assistant", "content": render_assistant_calls(content, tuple(calls))}


def render_output(output: str) -> str:
    """An input `function_call_output` as the model reads it (Hermes' tool response)."""
    return f"<tool_response>\n{output}\n</tool_response>"


def as_the_model_reads(message: dict[str, Any]) -> dict[str, Any]:
    """A stored answer as the next turn's prompt shows it: a forced call (decoded as bare
    JSON) becomes the `<tool_call>` block the offered tools ask for; anything else as is."""
    meta = message.get("meta") or {}
    tools, choice = tools_from_meta(meta)
    if message.get("role") != "assistant" or not choice.forced:
        return message
    _, calls = split_answer(message["content"], tools, choice, "")
    if not calls:
        return message
    return {**message, "content": render_assistant_calls("", tuple(calls))}
