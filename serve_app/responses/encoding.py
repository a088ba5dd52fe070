"""`/v1/responses` answers as pure functions: the `openai` SDK's `Response` object
(`openai.types.responses.Response`) and the typed events of a streamed one.

A stream is: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per piece of text, then
`response.output_text.done`, `response.content_part.done`, `response.output_item.done` and
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer), each
with its `sequence_number`. A failure after the stream started is an error event (the SDKs
raise `APIError` on it).

With tools, each call the model made is a `function_call` item: `response.output_item.added`
(in progress), one `response.function_call_arguments.delta` (a call is sent once it is whole),
`.done` and `response.output_item.done`. A message item opens only on text that is not (yet
possibly) a call, and closes before a call's item; text held back as a possible call is sent
as an SSE comment, so that what was generated counts as sent (the saved answer is the raw
text, re-read into items on retrieval).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.exchange import Exchange
from serve_app.model_contract import AnswerChunk
from serve_app.openai_api.tool_calls import ToolCallStream
from serve_app.openai_api.tools import Tool, ToolCall, ToolChoice
from serve_app.refusals import server_error
from serve_app.responses.tool_items import (
    call_item,
    numbered,
    split_answer,
    tool_fields,
    tools_from_meta,
    tools_meta,
)


@dataclass(frozen=True)
class ResponseFacts:
    """What a response object says besides its answer: fixed when the request is planned,
    and kept with a stored answer (`Turn.answer_meta`)."""

    id: str
    created_at: float
    model: str
    instructions: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # GenerationParams names, as sent
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")

    def as_meta(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "model": self.model,
            "instructions": self.instructions,
            "params": self.params,
            "previous_response_id": self.previous_response_id,
            "metadata": self.metadata,
            **tools_meta(self.tools, self.tool_choice),
        }

    @classmethod
    def from_meta(cls, response_id: str, meta: Mapping[str, Any]) -> ResponseFacts:
        tools, choice = tools_from_meta(dict(meta))
        return cls(
            tools=tools,
            tool_choice=choice,
            id=response_id,
            created_at=meta["created_at"],
            model=meta["model"],
            instructions=meta.get("instructions"),
            params=meta.get("params") or {},
            previous_response_id=meta.get("previous_response_id"),
            metadata=meta.get("metadata"),
        )


def status_of(outcome: str, finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """A finished response's `status` and `incomplete_details`: a cut answer (the client left
    while it streamed) is incomplete, as is one that `max_output_tokens` ended."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if outcome != "success":
        return "incomplete", None
    return "completed", None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def message_item(
    facts: ResponseFacts, text: str | None, status: str, index: int = 0
) -> dict[str, Any]:
    """An output message (`text` None: not started, no content part yet); `index`: its place
    among the response's messages (the first has the plain id)."""
    content = [] if text is None else [output_text(text)]
    return {
        "id": f"msg_{facts.id[5:]}" + (f"_{index}" if index else ""),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_items(facts: ResponseFacts, text: str, status: str) -> list[dict[str, Any]]:
    """A whole answer's output items: its text as a message (if any, or if it made no call),
    then its calls."""
    rest, calls = split_answer(text, facts.tools, facts.tool_choice, facts.id)
    message = [message_item(facts, rest, status)] if rest or not calls else []
    return message + [call_item(c) for c in calls]


def response_object(
    facts: ResponseFacts,
    *,
    status: str,
    text: str | None = None,
    incomplete_details: dict[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int = 0,
    output: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `response` object; `text` None: no output yet (in progress), else the answer read
    into items (or `output`, the items as streamed); usage once known."""
    params = facts.params
    if output is None:
        output = [] if text is None else output_items(facts, text, status)
    return {
        "id": facts.id,
        "object": "response",
        "created_at": facts.created_at,
        "status": status,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": facts.instructions,
        "max_output_tokens": params.get("max_new_tokens"),
        "model": facts.model,
        "output": output,
        "previous_response_id": facts.previous_response_id,
        "store": facts.store,
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "text": {"format": {"type": "text"}},
        **tool_fields(facts.tools, facts.tool_choice),
        "truncation": "auto",
        "metadata": facts.metadata or {},
        "usage": None if prompt_tokens is None else usage(prompt_tokens, completion_tokens),
    }


def stored_response(response_id: str, answer: Mapping[str, Any]) -> dict[str, Any]:
    """The response object of a stored answer (a session message with its `meta`)."""
    meta = answer["meta"]
    status, details = status_of(meta["outcome"], meta.get("finish_reason"))
    return response_object(
        ResponseFacts.from_meta(response_id, meta),
        status=status,
        text=answer["content"],
        incomplete_details=details,
        prompt_tokens=meta["prompt_tokens"],
        completion_tokens=meta["completion_tokens"],
    )


class ResponseEvents:
    """The admission's encoder for a streamed response: the typed events, numbered."""

    def __init__(self, facts: ResponseFacts) -> None:
        self.facts = facts
        self._sequence = 0
        self._started = False
        self._choice = facts.tool_choice
        self._splitter = ToolCallStream(facts.tools) if self._choice.mode == "auto" else None
        self._held: list[str] = []  # a forced call's text, or blank text before a call
        self._items: list[dict[str, Any]] = []  # done
        self._text: list[str] | None = None  # the open message's text
        self._messages = 0
        self._calls = 0

    def _event(self, kind: str, **body: Any) -> str:
        data = {"type": kind, "sequence_number": self._sequence, **body}
        self._sequence += 1
        encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {encoded}\n\n"

    def _where(self) -> dict[str, Any]:
        item_id = message_item(self.facts, None, "", self._messages)["id"]
        return {"item_id": item_id, "output_index": len(self._items), "content_index": 0}

    def _start(self) -> str:
        if self._started:
            return ""
        self._started = True
        started = response_object(self.facts, status="in_progress")
        return "".join([
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ])  # fmt: skip

    def _open_message(self) -> str:
        if self._text is not None:
            return ""
        self._text = []
        item = message_item(self.facts, None, "in_progress", self._messages)
        return "".join([
            self._event("response.output_item.added", output_index=len(self._items), item=item),
            self._event("response.content_part.added", **self._where(), part=output_text("")),
        ])  # fmt: skip

    def _send_text(self, text: str, *, last: bool = False) -> str:
        if not text and not (last and self._held):
            return ""
        tools = self.facts.tool_choice.mode != "none"
        if tools and not last and self._text is None and not text.strip():
            # blank: kept until text follows (none between or around calls)
            self._held.append(text)
            return ""
        text, self._held = "".join(self._held) + text, []
        out = self._open_message()
        self._text.append(text)
        return out + self._event(
            "response.output_text.delta", **self._where(), delta=text, logprobs=[]
        )

    def _close_message(self, status: str) -> str:
        if self._text is None:
            return ""
        text, self._text = "".join(self._text), None
        item = message_item(self.facts, text, status, self._messages)
        where = self._where()
        self._messages += 1
        self._items.append(item)
        return "".join([
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=output_text(text)),
            self._event("response.output_item.done", output_index=where["output_index"],
                        item=item),
        ])  # fmt: skip

    def _send_call(self, call: ToolCall) -> str:
        call = numbered(call, self.facts.id, self._calls)
        self._calls += 1
        self._held = []  # blank text around calls is no message
        out = self._close_message("completed")
        index = len(self._items)
        item = call_item(call)
        where = {"item_id": item["id"], "output_index": index}
        self._items.append(item)
        return out + "".join([
            self._event("response.output_item.added", output_index=index,
                        item=call_item(call, "in_progress")),
            self._event("response.function_call_arguments.delta", **where,
                        delta=call.arguments),
            self._event("response.function_call_arguments.done", **where,
                        name=call.name, arguments=call.arguments),
            self._event("response.output_item.done", output_index=index, item=item),
        ])  # fmt: skip

    def chunk(self, exchange: Exchange, chunk: AnswerChunk) -> str:
        if not chunk.text:
            return ""
        out = self._start()
        if self._choice.forced:
            self._held.append(chunk.text)
        elif self._splitter is None:
            out += self._send_text(chunk.text)
        else:
            text, calls = self._splitter.feed(chunk.text)
            out += self._send_text(text) + "".join(self._send_call(c) for c in calls)
        return out or ": held\n\n"  # an SSE comment: generated, held as a possible call

    def end(self, exchange: Exchange) -> str:
        status, details = status_of("success", exchange.finish_reason)
        out = [self._start()]
        if self._choice.forced:
            held, self._held = "".join(self._held), []
            _, calls = split_answer(held, self.facts.tools, self._choice, self.facts.id)
            out.append(self._send_call(calls[0]) if calls else self._send_text(held))
        elif self._splitter is not None:
            out.append(self._send_text(self._splitter.flush(), last=not self._items))
        if not self._items and self._text is None:
            out.append(self._open_message())  # no output at all: one empty message
        out.append(self._close_message(status))
        done = response_object(
            self.facts,
            status=status,
            incomplete_details=details,
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
            output=self._items,
        )
        out.append(self._event(f"response.{status}", response=done))
        return "".join(out)

    def error(self) -> str:
        return server_error().sse()  # an error event: the SDKs raise APIError on it
