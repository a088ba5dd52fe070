"""The model deployment: owns one engine and streams answers. Its `max_ongoing_requests` is
ChatStream's concurrency limit (generations at once per replica), `max_queued_requests` the
bound on requests waiting for one. What it yields is the typed contract of model_contract.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from ray import serve

from serve_app import metrics
from serve_app.config import ChatStreamConfig
from serve_app.engines import make_engine
from serve_app.engines.base import Engine
from serve_app.engines.stop_strings import StopChunks
from serve_app.model_contract import (
    AnswerChunk,
    GenerationRequest,
    ModelItem,
    SlotAcquired,
    merge_chunks,
)

# Tokens counted per update of the generated-tokens metric (a metric update costs more than
# forwarding a chunk).
_METRIC_BATCH = 64


async def answer_stream(
    engine: Engine,
    request: GenerationRequest,
    *,
    interval_s: float = 0.0,
    count_tokens: Callable[[int], None] = lambda _: None,
) -> AsyncIterator[ModelItem]:
    """`SlotAcquired`, then the answer's chunks; the last one carries the finish reason.

    Tokens that were generated while this stream's consumer was busy arrive here as one chunk
    already (the engine drains its queue), so they go out as one item: fewer items through Ray
    when the stack falls behind, none delayed when it keeps up. With `interval_s`, chunks after
    the first are also coalesced over that interval. The request's stop strings cut the answer
    here (engines/stop_strings.py); on a match the engine's stream is closed before the last
    chunk goes out, so its slot is free at once. Per chunk this does no more than forward it;
    `count_tokens` (the metric of tokens the engine generated, those that a stop string drops
    included) is called in batches of `_METRIC_BATCH` tokens and at the end.
    """
    yield SlotAcquired(prompt_tokens=engine.prompt_tokens(request.prompt))
    stops = StopChunks(request.stop) if request.stop else None
    pending: list[AnswerChunk] = []
    last_flush = float("-inf")  # the first chunk goes out at once (time to first token)
    uncounted = 0
    last: AnswerChunk | None = None
    try:
        async with contextlib.aclosing(engine.stream(request)) as chunks:
            async for chunk in chunks:
                uncounted += chunk.num_tokens  # generated, whether or not a stop string drops it
                if stops is not None and (chunk := stops.feed(chunk)) is None:
                    continue  # all of its text is held back: it may begin a stop string
                if chunk.finish_reason is not None:
                    last = chunk
                    break  # leaving the `async with` closes the engine's stream
                if uncounted >= _METRIC_BATCH:
                    count_tokens(uncounted)
                    uncounted = 0
                if not interval_s:
                    yield chunk
                    continue
                pending.append(chunk)
                now = time.monotonic()
                if now - last_flush >= interval_s:
                    yield merge_chunks(pending)
                    pending, last_flush = [], now
        # An engine's last chunk always has a finish reason; a stream that ends without one
        # was given up.
        pending.append(last or AnswerChunk("", 0, finish_reason="abort"))
        yield merge_chunks(pending)
    finally:
        if uncounted:
            count_tokens(uncounted)


@serve.deployment
class ChatModel:
    async def __init__(self, config: ChatStreamConfig) -> None:
        self.stream_interval_s = config.stream_interval_ms / 1000.0
        self.engine = make_engine(config)
        await self.engine.start()  # the replica is not ready (no traffic) until the model is

    async def generate(self, request: GenerationRequest) -> AsyncIterator[ModelItem]:
        """`SlotAcquired` (the request holds a generation slot now), then `AnswerChunk`s, the
        last with its finish reason (see `answer_stream`)."""
        items = answer_stream(
            self.engine,
            request,
            interval_s=self.stream_interval_s,
            count_tokens=metrics.GENERATED_TOKENS.get().inc,
        )
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

    async def check_health(self) -> None:
        await self.engine.check_health()
