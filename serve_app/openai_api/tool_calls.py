"""Tool calls in the prompt and in the answer, in the Hermes format (as pure functions).

SmolLM2-135M-Instruct's chat template knows no `tools`, so ChatStream uses the widely used
Hermes convention (Qwen 2.5, Hermes 2/3 and NousResearch's function calling):

* the tools go into the system prompt, as JSON inside `<tools></tools>`, with the instruction
  to answer a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
* an assistant turn with `tool_calls` is rendered as those `<tool_call>` blocks;
* a `role: tool` message is rendered as a user turn holding `<tool_response>...</tool_response>`.

All of this is plain message text: it is tokenized as text and can never become a control
token (engines/chat_tokens.py). Under `tool_choice: auto` the answer's `<tool_call>` blocks
whose JSON names a known tool become `tool_calls`; anything else stays text. A forced call is
decoded as bare JSON (`tools.forced_call_schema`) and read by `parse_forced_call`.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from serve_app.openai_api.tools import Tool, ToolCall

_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def new_call_id() -> str:
    """An id in OpenAI's shape (`call_` + 24 characters)."""
    return "call_" + secrets.token_hex(12)


def tools_system_prompt(tools: tuple[Tool, ...]) -> str:
    """The system-prompt text that offers the tools to the model."""
    specs = "\n".join(
        json.dumps(
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
        )
        for t in tools
    )
    return (
        "You may call one or more functions to assist with the user query. "
        "The functions are described inside <tools></tools>:\n"
        f"<tools>\n{specs}\n</tools>\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def with_tools_system(
    messages: list[dict[str, str]], tools: tuple[Tool, ...]
) -> list[dict[str, str]]:
    """`messages` with the tools offered in the (first) system message."""
    if not tools:
        return messages
    offer = tools_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{offer}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": offer}, *messages]


def render_assistant_calls(content: str, calls: tuple[ToolCall, ...]) -> str:
    """An assistant turn that made calls, as the model would have written it."""
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c.name, "arguments": _arguments_value(c.arguments)})
        + "\n</tool_call>"
        for c in calls
    ]
    return "\n".join([content, *blocks] if content else blocks)


def render_tool_result(content: str) -> dict[str, str]:
    """A `role: tool` message as the user turn the model reads."""
    return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # sent back as the client gave it


def _call_from_json(text: str, names: set[str]) -> ToolCall | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _arguments_value(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_call_id(), name=data["name"], arguments=json.dumps(arguments))


def extract_tool_calls(text: str, tools: tuple[Tool, ...]) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer's text without its valid `<tool_call>` blocks, and the calls they hold."""
    names = {t.name for t in tools}
    calls: list[ToolCall] = []

    def take(match: re.Match[str]) -> str:
        call = _call_from_json(match.group(1), names)
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = _CALL_BLOCK.sub(take, text)
    return (rest.strip() if calls else text), tuple(calls)


def parse_forced_call(text: str, tools: tuple[Tool, ...]) -> ToolCall | None:
    """The call decoded under `forced_call_schema` (None if the text is not one, e.g. cut off
    by `max_tokens`)."""
    return _call_from_json(text.strip(), {t.name for t in tools})


class ToolCallStream:
    """Splits a streamed `auto` answer into text deltas and calls. Text that may be the start
    of a `<tool_call>` block is held back until the block closes (a call) or cannot be one
    (text)."""

    _OPEN, _CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, tools: tuple[Tool, ...]) -> None:
        self._names = {t.name for t in tools}
        self._pending = ""
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The text that can be sent now, and the calls completed by `delta`."""
        self._pending += delta
        out, new = [], []
        while True:
            start = self._pending.find(self._OPEN)
            if start < 0:
                keep = _partial_suffix(self._pending, self._OPEN)
                out.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            end = self._pending.find(self._CLOSE, start)
            if end < 0:
                out.append(self._pending[:start])
                self._pending = self._pending[start:]
                break
            block = self._pending[start : end + len(self._CLOSE)]
            call = _call_from_json(block[len(self._OPEN) : -len(self._CLOSE)].strip(), self._names)
            out.append(self._pending[:start] if call else self._pending[:start] + block)
            if call:
                new.append(call)
            self._pending = self._pending[end + len(self._CLOSE) :]
        self.calls.extend(new)
        return "".join(out), new

    def flush(self) -> str:
        """What is left when the answer ends (an unclosed block is text)."""
        rest, self._pending = self._pending, ""
        return rest


def _partial_suffix(text: str, token: str) -> int:
    """The length of the longest end of `text` that begins `token`."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


def message_tool_calls(calls: tuple[ToolCall, ...] | list[ToolCall]) -> list[dict[str, Any]]:
    """`choices[0].message.tool_calls` of a whole answer."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def delta_tool_calls(calls: list[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """`choices[0].delta.tool_calls` of a chunk: each call whole, numbered from `first_index`
    (a call is sent once it is complete, as one delta)."""
    return [
        {"index": first_index + i, **entry} for i, entry in enumerate(message_tool_calls(calls))
    ]


def function_call_item(call: ToolCall) -> dict[str, Any]:
    """A Responses API output item of type `function_call`."""
    return {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }
