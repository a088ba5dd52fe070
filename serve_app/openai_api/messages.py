"""A chat request's `messages` as plain `{role, content}` dicts, as a pure function.

Text parts of an array `content` are joined with "\\n" (as vLLM does); other part types
(images, audio, files) are refused naming `messages[i].content[j].type`. `developer` messages
are system messages; `function` messages are refused. Assistant `tool_calls` and `tool`
messages are rendered into the prompt as text by tool_calls.py. Unknown keys of messages and
content parts (Open WebUI's `cache_control`) are accepted, ignored and reported.
"""

from __future__ import annotations

from typing import Any

from serve_app.openai_api.body import _ignored_keys
from serve_app.openai_api.tool_calls import render_assistant_calls, render_tool_result
from serve_app.openai_api.tools import parse_message_tool_calls
from serve_app.refusals import invalid_request, unsupported_parameter

MAX_MESSAGES = 2048
MAX_CONTENT_CHARS = 1_000_000  # all messages together; the context check comes later
_MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tool_calls": ([],),
    "function_call": (),
    "audio": (),
    "refusal": (),
    "annotations": ([],),
    "name": (),  # a participant's name would change the prompt; it is not rendered
    "tool_call_id": (),
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parse_content(content: Any, where: str, ignored: list[str]) -> str:
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
            ignored += _ignored_keys(part, {"type", "text"}, prefix=f"{where}[{j}].")
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


def _parse_messages(raw: Any, ignored: list[str]) -> list[dict[str, str]]:
    """The conversation; unknown keys of messages and parts are added to `ignored`."""
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
            own = {"role", "content", "tool_call_id"}
            ignored += _ignored_keys(message, own, _MESSAGE_NEUTRAL, f"{where}.")
            content = message.get("content")
            text = "" if content is None else _parse_content(content, f"{where}.content", ignored)
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
        ignored += _ignored_keys(message, own, _MESSAGE_NEUTRAL, f"{where}.")
        content = message.get("content")
        if content is None and role != "assistant":
            raise invalid_request(
                f"'{where}.content' is required", f"{where}.content", "missing_required_parameter"
            )
        text = "" if content is None else _parse_content(content, f"{where}.content", ignored)
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
