"""`/v1/responses` answers as pure functions: the `openai` SDK's `Response` object
(`openai.types.responses.Response`) and the typed events of a streamed one.

A stream is: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per piece of text, then
`response.output_text.done`, `response.content_part.done`, `response.output_item.done` and
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer), each
with its `sequence_number`. A failure after the stream started is an error event (the SDKs
raise `APIError` on it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.exchange import Exchange
from serve_app.model_contract import AnswerChunk
from serve_app.refusals import server_error


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

    def as_meta(self) -> dict[str, Any]:
        return {
            "created_at": self.created_at,
            "model": self.model,
            "instructions": self.instructions,
            "params": self.params,
            "previous_response_id": self.previous_response_id,
            "metadata": self.metadata,
        }

    @classmethod
    def from_meta(cls, response_id: str, meta: Mapping[str, Any]) -> ResponseFacts:
        return cls(
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


def message_item(facts: ResponseFacts, text: str | None, status: str) -> dict[str, Any]:
    """The one output message (`text` None: not started, no content part yet)."""
    content = [] if text is None else [output_text(text)]
    return {
        "id": f"msg_{facts.id[5:]}",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(
    facts: ResponseFacts,
    *,
    status: str,
    text: str | None = None,
    incomplete_details: dict[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int = 0,
) -> dict[str, Any]:
    """A `response` object; `text` None: no output yet (in progress); usage once known."""
    params = facts.params
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
        "output": [] if text is None else [message_item(facts, text, status)],
        "parallel_tool_calls": False,
        "previous_response_id": facts.previous_response_id,
        "store": facts.store,
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
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
        self._text: list[str] = []

    def _event(self, kind: str, **body: Any) -> str:
        data = {"type": kind, "sequence_number": self._sequence, **body}
        self._sequence += 1
        encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {encoded}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": f"msg_{self.facts.id[5:]}", "output_index": 0, "content_index": 0}

    def _start(self) -> str:
        if self._started:
            return ""
        self._started = True
        started = response_object(self.facts, status="in_progress")
        return "".join([
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
            self._event("response.output_item.added", output_index=0,
                        item=message_item(self.facts, None, "in_progress")),
            self._event("response.content_part.added", **self._where(), part=output_text("")),
        ])  # fmt: skip

    def chunk(self, exchange: Exchange, chunk: AnswerChunk) -> str:
        if not chunk.text:
            return ""
        self._text.append(chunk.text)
        start = self._start()
        delta = self._event(
            "response.output_text.delta", **self._where(), delta=chunk.text, logprobs=[]
        )
        return start + delta

    def end(self, exchange: Exchange) -> str:
        text = "".join(self._text)
        status, details = status_of("success", exchange.finish_reason)
        done = response_object(
            self.facts,
            status=status,
            text=text,
            incomplete_details=details,
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
        )
        item = message_item(self.facts, text, status)
        return "".join([
            self._start(),
            self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._where(), part=output_text(text)),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event(f"response.{status}", response=done),
        ])  # fmt: skip

    def error(self) -> str:
        return server_error().sse()  # an error event: the SDKs raise APIError on it
