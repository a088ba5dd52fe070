"""`/v1` responses as pure functions: the shapes of the `openai` SDK's `ChatCompletion`,
`ChatCompletionChunk` and `Model`, and Server-Sent Events framing.

With `logprobs` asked for, each text chunk carries its tokens' log probabilities
(serve_app/openai_api/logprobs.py), and so does the whole answer's choice.

A stream is: first chunk (role, and best also the first text), text chunks, a final chunk with
an empty delta and `finish_reason`, the usage chunk if asked for, then `data: [DONE]`. Token
counts and the finish reason are the engine's (serve_app/model_contract.py). With `n` choices,
each choice has its own chunks (its `index`), interleaved as they are generated, and its own
final chunk; the usage chunk (all choices' tokens) and `[DONE]` come once, after all of them.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.model_contract import TokenLogprob
from serve_app.openai_api.logprobs import chat_logprobs
from serve_app.openai_api.protocol import ChatCompletionRequest

OWNED_BY = "chatstream"


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class ChunkBuilder:
    """The `chat.completion.chunk` objects of one streamed answer (one id, one timestamp)."""

    model: str
    include_usage: bool = False
    index: int = 0  # the choice (`n` > 1: one builder per choice, sharing id and created)
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

    def delta(
        self,
        content: str | None = None,
        *,
        first: bool = False,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        """A text chunk; the `first` one also carries `role: assistant`. `logprobs`: its
        tokens' (None when the request asked for none)."""
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        delta["content"] = content if content is not None or not first else ""
        encoded = None if logprobs is None else chat_logprobs(logprobs)
        return self._chunk(
            [{"index": self.index, "delta": delta, "logprobs": encoded, "finish_reason": None}]
        )

    def tool_calls(self, calls: list[dict[str, Any]], *, first: bool = False) -> dict[str, Any]:
        """A chunk carrying whole tool calls (`delta.tool_calls`, each with its `index`)."""
        delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
        delta["tool_calls"] = calls
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._chunk([choice])

    def finish(self, reason: str) -> dict[str, Any]:
        """The last choice chunk: empty delta, `finish_reason` stop|length."""
        choice = {"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return self._chunk([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The usage chunk (no choices), sent after `finish` when `include_usage`."""
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))


def chat_choice(
    *,
    content: str,
    finish_reason: str,
    index: int = 0,
    logprobs: Sequence[TokenLogprob] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a non-streamed `chat.completion` (with `logprobs`, if asked for, and the
    `tool_calls` the model made)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message.update(content=content or None, tool_calls=tool_calls)
    return {
        "index": index,
        "message": message,
        "logprobs": None if logprobs is None else chat_logprobs(logprobs),
        "finish_reason": finish_reason,
    }


def chat_completion_of(
    *,
    model: str,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
    id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A non-streamed `chat.completion` of `choices` (`chat_choice`s); `usage` counts them all."""
    return {
        "id": id or new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_completion(
    *,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    id: str | None = None,
    created: int | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A non-streamed `chat.completion` of one choice, with `usage`."""
    choice = chat_choice(
        content=content, finish_reason=finish_reason, logprobs=logprobs, tool_calls=tool_calls
    )
    return chat_completion_of(
        model=model,
        choices=[choice],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        id=id,
        created=created,
    )


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


class StreamEncoder:
    """The SSE text of one streamed answer.

    `feed(text, completion_tokens)` returns what to send now ("" when nothing: send nothing,
    it is no chunk); the first text goes out with `role: assistant`. `end(...)` returns the
    rest: `finish(...)`, the `finish_reason` chunk of this choice, then `close(...)`, the usage
    chunk if asked for and `data: [DONE]` (once per stream, whatever `n`). With vLLM's
    continuous usage, each text chunk carries the usage so far.
    """

    def __init__(self, request: ChatCompletionRequest, builder: ChunkBuilder | None = None):
        self._request = request
        self.builder = builder or ChunkBuilder(request.model, include_usage=request.include_usage)
        self.include_usage = request.include_usage
        self.continuous_usage = request.continuous_usage
        self.with_logprobs = request.sampling.logprobs is not None
        self._started = False

    def for_choice(self, index: int) -> StreamEncoder:
        """A fresh encoder of choice `index` in the same stream (same id and timestamp)."""
        return StreamEncoder(self._request, dataclasses.replace(self.builder, index=index))

    def feed(
        self,
        text: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> str:
        if not text and not logprobs and self._started:
            return ""
        chunk = self.builder.delta(
            text, first=not self._started, logprobs=logprobs if self.with_logprobs else None
        )
        if self.continuous_usage:
            chunk["usage"] = usage(prompt_tokens, completion_tokens)
        self._started = True
        return sse_event(chunk)

    def feed_tool_calls(self, calls: list[dict[str, Any]]) -> str:
        """A chunk of whole `delta.tool_calls` (the first chunk also carries the role)."""
        chunk = self.builder.tool_calls(calls, first=not self._started)
        self._started = True
        return sse_event(chunk)

    def end(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> str:
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return self.finish(finish_reason=finish_reason, **counts) + self.close(**counts)

    def finish(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> str:
        """This choice's last chunk (after the role chunk, if nothing went out before)."""
        finish = self.builder.finish(finish_reason)
        if self.continuous_usage:
            finish["usage"] = usage(prompt_tokens, completion_tokens)
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return (self.feed("", **counts) if not self._started else "") + sse_event(finish)

    def close(self, *, prompt_tokens: int, completion_tokens: int) -> str:
        """The stream's end: the usage chunk if asked for, then `data: [DONE]`."""
        events = []
        if self.include_usage:
            events.append(sse_event(self.builder.usage(prompt_tokens, completion_tokens)))
        events.append(SSE_DONE)
        return "".join(events)
