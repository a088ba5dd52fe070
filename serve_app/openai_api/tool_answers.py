"""A chat completion's answer when the request has tools: text and `tool_calls`, whole or as
SSE chunks. Under `auto` the model's `<tool_call>` blocks become calls (held back while they
may be one); under a forced choice the whole answer is one call decoded under its schema.
`finish_reason` is `tool_calls` when a call was made (OpenAI's), else the engine's."""

from __future__ import annotations

from typing import Any

from serve_app.config import GenerationParams
from serve_app.model_contract import GenerationRequest, OutputConstraint
from serve_app.openai_api.encoding import StreamEncoder
from serve_app.openai_api.protocol import ChatCompletionRequest
from serve_app.openai_api.sampling import check_engine
from serve_app.openai_api.tool_calls import (
    ToolCallStream,
    delta_tool_calls,
    extract_tool_calls,
    message_tool_calls,
    parse_forced_call,
    with_tools_system,
)
from serve_app.openai_api.tools import forced_call_constraint


def messages_with_tools(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages, with the tools offered in the system prompt unless `tool_choice: none`."""
    if request.tool_choice.mode == "none":
        return request.messages
    return with_tools_system(request.messages, request.tools)


def tool_constraint(request: ChatCompletionRequest, engine: str) -> OutputConstraint | None:
    """The constraint of a forced call; a 400 naming the engine if it cannot decode under it."""
    constraint = forced_call_constraint(request.tools, request.tool_choice)
    return engine_constraint(constraint, engine, "tool_choice")


def engine_constraint(
    constraint: OutputConstraint | None, engine: str, param: str
) -> OutputConstraint | None:
    """`constraint` if `engine` honours it, else a 400 naming `param` and the engine (the
    feature check of every sampling field, `sampling.check_engine`)."""
    if constraint is not None:
        alone = GenerationRequest(prompt="", params=GenerationParams(), constraint=constraint)
        check_engine(engine, alone, param)
    return constraint


def answer_with_calls(
    request: ChatCompletionRequest, text: str
) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer's content and its `tool_calls` (OpenAI's shape; [] when none)."""
    if request.tool_choice.forced:
        call = parse_forced_call(text, request.tools)
        return ("", message_tool_calls([call])) if call else (text, [])
    if request.tool_choice.mode == "auto":
        content, calls = extract_tool_calls(text, request.tools)
        return content, message_tool_calls(calls)
    return text, []


def finish_reason(engine_reason: str, tool_calls: list[Any]) -> str:
    return "tool_calls" if tool_calls and engine_reason == "stop" else engine_reason


class ToolStreamEncoder:
    """A `StreamEncoder` for a request with tools: text deltas, then each call as one chunk."""

    def __init__(self, request: ChatCompletionRequest, encoder: StreamEncoder) -> None:
        self._request = request
        self._encoder = encoder
        self._forced = request.tool_choice.forced
        self._splitter = ToolCallStream(request.tools)
        self._held = ""  # a forced call's text, parsed at the end
        self._sent_calls = 0

    def for_choice(self, index: int) -> ToolStreamEncoder:
        """A fresh encoder of choice `index` in the same stream."""
        return ToolStreamEncoder(self._request, self._encoder.for_choice(index))

    def feed(self, text: str, **counts: int) -> str:
        if self._forced:
            self._held += text
            return ""
        out, calls = self._splitter.feed(text)
        return (self._encoder.feed(out, **counts) if out else "") + self._calls(calls)

    def _calls(self, calls: list) -> str:
        if not calls:
            return ""
        events = self._encoder.feed_tool_calls(delta_tool_calls(calls, self._sent_calls))
        self._sent_calls += len(calls)
        return events

    def end(self, *, finish_reason: str, **counts: int) -> str:
        return self.finish(finish_reason=finish_reason, **counts) + self.close(**counts)

    def close(self, **counts: int) -> str:
        return self._encoder.close(**counts)

    def finish(self, *, finish_reason: str, **counts: int) -> str:
        """The held text or call, then this choice's `finish_reason` chunk."""
        events = []
        if self._forced:
            call = parse_forced_call(self._held, self._request.tools)
            if call:
                events.append(self._calls([call]))
            elif self._held:  # not a call (cut off by the token budget): sent as text
                events.append(self._encoder.feed(self._held, **counts))
        else:
            rest = self._splitter.flush()
            if rest:
                events.append(self._encoder.feed(rest, **counts))
        reason = "tool_calls" if self._sent_calls and finish_reason == "stop" else finish_reason
        events.append(self._encoder.finish(finish_reason=reason, **counts))
        return "".join(events)
