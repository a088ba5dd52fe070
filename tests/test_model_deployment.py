"""The model deployment's side of the contract (model_contract.py), on the mock engine and
without Ray: `ChatModel.generate` yields `SlotAcquired`, then `AnswerChunk`s whose last one
carries the finish reason; stop strings are cut here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.engines.base import ChatMessage, Engine
from serve_app.engines.mock import MockPromptFormatter
from serve_app.model_contract import (
    AnswerChunk,
    GenerationRequest,
    SlotAcquired,
    TokenLogprob,
    merge_chunks,
)
from serve_app.model_deployment import ChatModel, answer_stream

PROMPT = MockPromptFormatter(ChatStreamConfig(engine="mock")).render(
    [ChatMessage("system", "be brief"), ChatMessage("user", "alpha beta gamma")]
)


async def chat_model(**config) -> ChatModel:
    """The deployment's class as Serve would build it, without Serve."""
    model = object.__new__(ChatModel.func_or_class)
    await model.__init__(ChatStreamConfig(engine="mock", **config))
    return model


async def items_of(model, prompt: str = PROMPT, max_new_tokens: int = 8, **request) -> list:
    params = GenerationParams(max_new_tokens=max_new_tokens)
    return [item async for item in model.generate(GenerationRequest(prompt, params, **request))]


def text_of(items: list) -> str:
    return "".join(item.text for item in items[1:])


async def test_slot_acquired_then_chunks_and_the_finish_reason_last():
    model = await chat_model(mock_mode="echo")
    items = await items_of(model)
    counted = MockPromptFormatter(ChatStreamConfig(engine="mock")).count_tokens(PROMPT)
    assert items[0] == SlotAcquired(prompt_tokens=counted) and counted > 5
    assert all(isinstance(item, AnswerChunk) for item in items[1:])
    assert text_of(items) == "alpha beta gamma"
    assert [i.finish_reason for i in items[1:]] == [None, None, "stop"]  # the echo ended
    assert [i.num_tokens for i in items[1:]] == [1, 1, 1]
    assert all(i.token_ids == () for i in items[1:])  # the mock has no token ids
    # A token-id prompt counts its ids.
    assert model.engine.prompt_tokens([5, 6, 7]) == 3

    cut = await items_of(model, max_new_tokens=2)
    assert text_of(cut) == "alpha beta"
    assert cut[-1].finish_reason == "length"
    assert sum(i.num_tokens for i in cut[1:]) == 2


async def test_round_and_long_end_with_length():
    for mode in ("round", "long"):
        model = await chat_model(mock_mode=mode)
        items = await items_of(model, max_new_tokens=7)
        assert sum(i.num_tokens for i in items[1:]) == 7
        assert [i.finish_reason for i in items[1:]] == [None] * 6 + ["length"]


async def test_stop_strings_are_cut_on_the_model_side_and_free_the_slot():
    model = await chat_model(mock_mode="round", mock_time_per_token_sec=0.001)
    stream = model.generate(
        GenerationRequest(PROMPT, GenerationParams(max_new_tokens=50), stop=("gamma", "zzz"))
    )
    items = [item async for item in stream]
    assert text_of(items) == "alpha beta "
    assert items[-1].finish_reason == "stop"
    assert [i.finish_reason for i in items[1:-1]] == [None] * (len(items) - 2)
    assert sum(i.num_tokens for i in items[1:]) == 2  # the tokens of the text sent
    assert model.engine.running == 0

    # The stop string spans chunks, and a stop string of one request does not leak into another.
    spanning = await items_of(model, max_new_tokens=50, stop=("beta gam",))
    assert text_of(spanning) == "alpha " and spanning[-1].finish_reason == "stop"
    assert text_of(await items_of(model, max_new_tokens=4)) == "alpha beta gamma alpha"


async def test_the_engine_stream_is_closed_before_the_last_chunk_goes_out():
    model = await chat_model(mock_mode="round", mock_time_per_token_sec=0.001)
    stream = model.generate(
        GenerationRequest(PROMPT, GenerationParams(max_new_tokens=500), stop=("gamma",))
    )
    async for item in stream:
        if isinstance(item, AnswerChunk) and item.finish_reason:
            assert model.engine.running == 0  # the slot was free before this chunk came
    await stream.aclose()


async def test_closing_the_stream_frees_the_engine_at_once():
    model = await chat_model(mock_mode="long", mock_time_per_token_sec=0.001)
    stream = model.generate(GenerationRequest(PROMPT, GenerationParams(max_new_tokens=500)))
    assert isinstance(await anext(stream), SlotAcquired)
    await anext(stream)
    assert model.engine.running == 1
    await stream.aclose()
    assert model.engine.running == 0


async def test_stream_interval_coalesces_chunks_and_keeps_the_finish_reason():
    model = await chat_model(mock_mode="long", mock_time_per_token_sec=0.002, stream_interval_ms=40)
    items = await items_of(model, max_new_tokens=60)
    chunks = items[1:]
    assert sum(c.num_tokens for c in chunks) == 60
    assert len(chunks) < 30  # coalesced: ~120 ms of tokens over 40 ms intervals
    assert chunks[0].num_tokens == 1  # the first one goes out at once
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_seed_is_accepted_and_the_mock_stays_deterministic():
    model = await chat_model(mock_mode="round")
    assert text_of(await items_of(model, seed=1)) == text_of(await items_of(model, seed=2))


async def test_token_metric_is_counted_in_batches():
    model = await chat_model(mock_mode="long")
    counts: list[int] = []
    request = GenerationRequest(PROMPT, GenerationParams(max_new_tokens=150))
    items = [i async for i in answer_stream(model.engine, request, count_tokens=counts.append)]
    assert counts == [64, 64, 22]
    assert sum(i.num_tokens for i in items[1:]) == 150

    # The metric counts what the engine generated, also the tokens a stop string drops.
    counts.clear()
    cut = GenerationRequest(PROMPT, GenerationParams(max_new_tokens=150), stop=("lets",))
    items = [i async for i in answer_stream(model.engine, cut, count_tokens=counts.append)]
    assert "".join(i.text for i in items[1:]) == "Streaming "
    assert sum(i.num_tokens for i in items[1:]) == 1 and counts == [2]


class EndsWithoutReason(Engine):
    """An engine that breaks the contract: its stream ends with no finish reason."""

    async def start(self) -> None:
        return None

    def count_text_tokens(self, text: str) -> int:
        return 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]:
        yield AnswerChunk("partial", 1)


async def test_a_stream_that_ends_without_a_reason_is_an_abort():
    request = GenerationRequest("prompt", GenerationParams())
    items = [i async for i in answer_stream(EndsWithoutReason(), request)]
    assert items == [
        SlotAcquired(prompt_tokens=1),
        AnswerChunk("partial", 1),
        AnswerChunk("", 0, (), "abort"),
    ]
    coalesced = [i async for i in answer_stream(EndsWithoutReason(), request, interval_s=10.0)]
    assert coalesced[1:] == [AnswerChunk("partial", 1), AnswerChunk("", 0, (), "abort")]


async def test_concurrent_streams_keep_their_own_stops():
    model = await chat_model(mock_mode="round", mock_time_per_token_sec=0.001)
    results = await asyncio.gather(
        items_of(model, max_new_tokens=6, stop=("beta",)),
        items_of(model, max_new_tokens=6),
        items_of(model, max_new_tokens=6, stop=(" alpha",)),
    )
    assert [text_of(r) for r in results] == [
        "alpha ",
        "alpha beta gamma alpha beta gamma",
        "alpha beta gamma",
    ]
    assert [r[-1].finish_reason for r in results] == ["stop", "length", "stop"]


class Gated(Engine):
    """An engine whose first token is ready at once and whose next two wait for `go`."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def start(self) -> None:
        return None

    def count_text_tokens(self, text: str) -> int:
        return 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]:
        yield AnswerChunk("a", 1, (1,), logprobs=(TokenLogprob(1, "a", -0.1),))
        await self.go.wait()
        yield AnswerChunk("b", 1, (2,), logprobs=(TokenLogprob(2, "b", -0.2),))
        yield AnswerChunk("c", 1, (3,), "length", logprobs=(TokenLogprob(3, "c", -0.3),))


async def test_the_first_chunk_goes_out_while_the_engine_works_on_the_next():
    """No coalescing holds the first chunk back (time to first token), with or without
    stream_interval_ms; chunks merged later keep their text, token ids and log probabilities."""
    request = GenerationRequest("prompt", GenerationParams(), logprobs=0)
    for interval_s in (0.0, 10.0):
        engine = Gated()
        items = answer_stream(engine, request, interval_s=interval_s)
        assert isinstance(await items.__anext__(), SlotAcquired)
        first = await asyncio.wait_for(items.__anext__(), timeout=30)  # the engine is gated
        assert (first.text, first.token_ids) == ("a", (1,))
        engine.go.set()
        rest = merge_chunks([chunk async for chunk in items])
        assert (rest.text, rest.num_tokens, rest.token_ids) == ("bc", 2, (2, 3))
        assert [lp.token_id for lp in rest.logprobs] == [2, 3]
        assert rest.finish_reason == "length"
