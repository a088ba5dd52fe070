"""One admitted request with `n` choices: n model streams, merged into one.

OpenAI's `n` asks for n answers to one prompt. Each choice is its own model call, so it holds
one of the model's generation slots, exactly as n requests would: the fair queue gives the
request n places at once (fair_queue.py) and the engines see n ordinary generations (vLLM's
prefix cache shares the prompt's prefill; the transformers engine prefills the n rows in one
batched pass). That keeps "N generations at once" true for every engine without an `n` in the
model contract, and keeps the engines unchanged. The alternative, the contract carrying `n`
to the engine, would let one slot run n generations, hidden from the admission's count.

For the admission, the merged stream is one model stream: its first item is one
`SlotAcquired` (once every choice holds its slot), then each choice's chunks, tagged with the
choice's `index`, as they arrive. One choice failing fails the stream (and cancels the others);
`cancel()` cancels all n. The request has one outcome, one callback and one ledger entry.

Each choice's call is made as a request of its own for Serve's router (`call_apart`): Serve
2.60 gives every call made while handling one HTTP request that request's
`internal_request_id`, and its request router indexes waiting calls by that id, so n calls in
flight at once from one request overwrite each other there and all but one wait (seen here: 10
s, then forever). The ingress cancels the n calls itself (`cancel`), so Serve's cancelling of a
parent's calls by that id is not needed.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ray.serve import context as serve_context

from serve_app.model_contract import AnswerChunk, ModelItem, SlotAcquired, merge_chunks

logger = logging.getLogger("ray.serve")

_END = object()  # a choice's stream is over
T = TypeVar("T")


def call_apart(call: Callable[[], T]) -> T:
    """`call()` (a handle's `.remote(...)`) under a fresh `internal_request_id`, in a copy of
    the context: the caller's own request context is left as it was."""

    def apart() -> T:
        current = serve_context._get_serve_request_context()
        own = dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex)
        serve_context._serve_request_context.set(own)
        return call()

    return contextvars.copy_context().run(apart)


async def _pull(stream: Any) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


class ChoiceStreams:
    """n model streams (Serve's streaming responses) as one, with the interface the admission
    uses: async iteration and `cancel()`."""

    def __init__(self, streams: Sequence[Any]) -> None:
        self._streams = list(streams)
        self._pending: dict[int, asyncio.Task] = {}  # index -> its next item
        self._open = set(range(len(self._streams)))
        self._slots_taken = False

    def __aiter__(self) -> ChoiceStreams:
        return self

    async def __anext__(self) -> ModelItem:
        try:
            if not self._slots_taken:
                return await self._take_slots()
            return await self._next_chunk()
        except StopAsyncIteration:
            raise
        except BaseException:
            self.cancel()  # a refusal, a failed choice or a cancelled wait: all n go
            raise

    async def _take_slots(self) -> SlotAcquired:
        for index in self._open:
            self._pending[index] = asyncio.ensure_future(_pull(self._streams[index]))
        slots = await asyncio.gather(*self._pending.values())
        self._pending.clear()
        self._slots_taken = True
        for slot in slots:
            if not isinstance(slot, SlotAcquired):
                raise RuntimeError(f"a choice's first item was {slot!r}")
        return SlotAcquired(prompt_tokens=slots[0].prompt_tokens)  # one prompt, counted once

    async def _next_chunk(self) -> AnswerChunk:
        while True:
            for index in self._open - self._pending.keys():
                self._pending[index] = asyncio.ensure_future(_pull(self._streams[index]))
            if not self._pending:
                raise StopAsyncIteration
            await asyncio.wait(self._pending.values(), return_when=asyncio.FIRST_COMPLETED)
            index = min(i for i, task in self._pending.items() if task.done())
            item = self._pending.pop(index).result()
            if item is _END:
                self._open.discard(index)
                continue
            return dataclasses.replace(item, index=index)

    def cancel(self) -> None:
        """Cancel every choice's generation (idempotent)."""
        for task in self._pending.values():
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure already reported is not logged again
            task.cancel()
        self._pending.clear()
        self._open.clear()
        for stream in self._streams:
            try:  # as the admission does: cancel() may re-raise how the call ended
                stream.cancel()
            except Exception as error:
                logger.debug("cancelling a choice raised %r", error)


def split_choices(chunks: Sequence[AnswerChunk], n: int) -> list[AnswerChunk]:
    """A whole answer's chunks as each choice's answer, by index (0 to n-1)."""
    by_index: dict[int, list[AnswerChunk]] = {i: [] for i in range(n)}
    for chunk in chunks:
        by_index[chunk.index].append(chunk)
    return [
        merge_chunks(parts) if parts else AnswerChunk("", 0, index=i)
        for i, parts in by_index.items()
    ]
