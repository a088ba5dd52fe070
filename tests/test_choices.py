"""OpenAI's `n` choices without a server: the fair queue's places, n model streams merged into
one (serve_app/choices.py), and the SSE / JSON shapes of several choices."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError

from serve_app.choices import ChoiceStreams, call_apart, split_choices
from serve_app.config import GenerationParams
from serve_app.exchange import Exchange
from serve_app.fair_queue import FairQueue
from serve_app.model_contract import AnswerChunk, GenerationRequest, SlotAcquired
from serve_app.openai_api.completions import CompletionStreamEncoder, parse_completion
from serve_app.openai_api.encoding import StreamEncoder
from serve_app.openai_api.protocol import parse_chat_completion
from serve_app.openai_api.sampling import choice_requests
from serve_app.openai_api.service import SSEAnswer, check_choices
from serve_app.refusals import Refusal

MODEL = "m"


def run(coro):
    return asyncio.run(coro)


class FakeStream:
    """A model stream as Serve's handle gives it: async iteration, `cancel()`."""

    def __init__(self, items: list, *, fail: BaseException | None = None, hold: bool = False):
        self.items = list(items)
        self.fail = fail
        self.hold = hold  # after its items, wait until cancelled
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.items:
            return self.items.pop(0)
        if self.fail is not None:
            raise self.fail
        if self.hold:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def answer(*texts: str, reason: str = "stop") -> list:
    chunks = [AnswerChunk(t, 1) for t in texts]
    last = chunks[-1]
    chunks[-1] = AnswerChunk(last.text, 1, finish_reason=reason)
    return [SlotAcquired(prompt_tokens=5), *chunks]


async def drain(stream) -> list:
    return [item async for item in stream]


# ---------------------------------------------------------------------------- fair queue
def test_a_request_of_n_places_waits_for_all_of_them_and_is_not_overtaken():
    async def scenario():
        queue = FairQueue(capacity=3, max_waiting=10)
        held = [await queue.enter("a"), await queue.enter("a")]
        big = asyncio.ensure_future(queue.enter("a", places=2))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(queue.enter("b"))
        await asyncio.sleep(0)
        assert not big.done() and not small.done()  # one place free: the head needs two
        held.pop().release()
        await asyncio.sleep(0)
        assert big.done() and not small.done() and queue.in_flight == 3
        (await big).release()
        await asyncio.sleep(0)
        assert small.done() and queue.in_flight == 2
        held.pop().release(), (await small).release()
        assert queue.in_flight == 0 and queue.snapshot()["tenants"] == {}

    run(scenario())


def test_a_request_of_more_places_than_the_model_has_is_not_held_forever():
    async def scenario():
        queue = FairQueue(capacity=2, max_waiting=10)
        ticket = await asyncio.wait_for(queue.enter("a", places=3), 1)
        assert queue.in_flight == 3
        ticket.release()
        assert queue.in_flight == 0

    run(scenario())


# --------------------------------------------------------------------------- the streams
def test_n_streams_merge_into_one_slot_then_chunks_tagged_with_their_choice():
    streams = [FakeStream(answer("a", "b")), FakeStream(answer("c", reason="length"))]
    items = run(drain(ChoiceStreams(streams)))
    assert items[0] == SlotAcquired(prompt_tokens=5)  # the prompt counted once
    chunks = items[1:]
    assert sorted((c.index, c.text) for c in chunks) == [(0, "a"), (0, "b"), (1, "c")]
    whole = split_choices(chunks, 2)
    assert [(w.index, w.text, w.finish_reason, w.num_tokens) for w in whole] == [
        (0, "ab", "stop", 2),
        (1, "c", "length", 1),
    ]
    assert not any(s.cancelled for s in streams)


def test_one_failing_choice_fails_the_stream_and_cancels_the_others():
    failing = FakeStream(answer("a")[:2], fail=RuntimeError("engine died"))
    others = [FakeStream(answer("b"), hold=True), FakeStream(answer("c"), hold=True)]

    async def scenario():
        with pytest.raises(RuntimeError, match="engine died"):
            await drain(ChoiceStreams([*others, failing]))

    run(scenario())
    assert all(s.cancelled for s in [*others, failing])


def test_a_refused_choice_refuses_the_request_and_frees_the_others_slots():
    admitted = FakeStream(answer("a"), hold=True)
    refused = FakeStream([], fail=BackPressureError(num_queued_requests=1, max_queued_requests=1))

    async def scenario():
        with pytest.raises(BackPressureError):
            await ChoiceStreams([admitted, refused]).__anext__()

    run(scenario())
    assert admitted.cancelled


def test_cancel_cancels_every_choice_while_they_generate():
    streams = [FakeStream(answer("a"), hold=True) for _ in range(3)]

    async def scenario():
        merged = ChoiceStreams(streams)
        await merged.__anext__()  # the slots
        consumer = asyncio.ensure_future(drain(merged))
        await asyncio.sleep(0.05)
        merged.cancel()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

    run(scenario())
    assert all(s.cancelled for s in streams)


def test_each_call_apart_is_a_request_of_its_own_for_serves_router():
    """Serve's router indexes waiting calls by `internal_request_id`: n calls sharing the
    request's id would wait on each other (choices.py)."""
    serve_context._set_request_context(request_id="req", _internal_request_id="parent")
    seen = [call_apart(serve_context._get_serve_request_context) for _ in range(3)]
    assert len({c._internal_request_id for c in seen}) == 3
    assert "parent" not in {c._internal_request_id for c in seen}
    assert {c.request_id for c in seen} == {"req"}  # the logs still name the request
    assert serve_context._get_serve_request_context()._internal_request_id == "parent"


# ------------------------------------------------------------------------- the requests
def test_each_choice_is_a_generation_with_its_own_derived_seed():
    base = GenerationRequest("hi", GenerationParams(), seed=7)
    assert [g.seed for g in choice_requests(base, 3)] == [7, 8, 9]
    assert choice_requests(base, 1) == [base]
    unseeded = choice_requests(GenerationRequest("hi", GenerationParams()), 2)
    assert [g.seed for g in unseeded] == [None, None]


def test_n_over_the_slots_is_a_400_naming_n():
    check_choices(4, slots=4)
    with pytest.raises(Refusal) as refused:
        check_choices(5, slots=4)
    assert (refused.value.status_code, refused.value.param) == (400, "n")
    assert "max_ongoing_requests" in refused.value.message


# ------------------------------------------------------------------------------ the wire
def sse_objects(text: str) -> list:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def exchange_with(prompt_tokens: int, completion_tokens: int) -> Exchange:
    exchange = Exchange(None, None, "r", "rec", "m", None, None)
    exchange.prompt_tokens, exchange.completion_tokens = prompt_tokens, completion_tokens
    return exchange


def test_a_streamed_chat_of_two_choices_ends_each_then_counts_both_once():
    chat = parse_chat_completion(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True,
         "stream_options": {"include_usage": True}},
        served_model=MODEL,
    )  # fmt: skip
    answer_ = SSEAnswer(StreamEncoder(chat), n=2)
    exchange = exchange_with(3, 0)
    wire = ""
    for chunk in [AnswerChunk("a", 1), AnswerChunk("b", 1, index=1, finish_reason="length"),
                  AnswerChunk("c", 1, finish_reason="stop")]:  # fmt: skip
        exchange.completion_tokens += 1
        wire += answer_.chunk(exchange, chunk)
    wire += answer_.end(exchange)
    objects = sse_objects(wire)
    assert len({o["id"] for o in objects}) == 1
    text, reasons = {0: "", 1: ""}, {}
    for obj in objects[:-1]:
        (choice,) = obj["choices"]
        text[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            reasons[choice["index"]] = choice["finish_reason"]
    assert text == {0: "ac", 1: "b"} and reasons == {0: "stop", 1: "length"}
    assert objects[-1]["choices"] == [] and objects[-1]["usage"]["completion_tokens"] == 3


def test_a_streamed_completion_of_two_choices_echoes_each():
    text = parse_completion(
        {"model": MODEL, "prompt": "p", "n": 2, "stream": True, "echo": True}, served_model=MODEL
    )
    answer_ = SSEAnswer(CompletionStreamEncoder(text, echoed="p"), n=2)
    exchange = exchange_with(1, 2)
    wire = answer_.chunk(exchange, AnswerChunk("x", 1, index=1, finish_reason="stop"))
    wire += answer_.end(exchange)  # choice 0 ended without a chunk: its ending still goes out
    got: dict[int, str] = {}
    reasons = {}
    for obj in sse_objects(wire):
        for choice in obj["choices"]:
            got[choice["index"]] = got.get(choice["index"], "") + choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons.get(choice["index"])
    assert got == {0: "p", 1: "px"} and reasons == {0: "stop", 1: "stop"}


def test_a_streamed_forced_tool_call_per_choice_each_with_its_own_call():
    from serve_app.openai_api.tool_answers import ToolStreamEncoder
    from tests.test_tools import WEATHER

    chat = parse_chat_completion(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True,
         "tools": [WEATHER], "tool_choice": "required"},
        served_model=MODEL,
    )  # fmt: skip
    answer_ = SSEAnswer(ToolStreamEncoder(chat, StreamEncoder(chat)), n=2)
    exchange = exchange_with(3, 4)
    wire = ""
    for index, city in [(1, "Rome"), (0, "Oslo")]:
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
        wire += answer_.chunk(exchange, AnswerChunk(call[:9], 1, index=index))
        wire += answer_.chunk(exchange, AnswerChunk(call[9:], 1, index=index, finish_reason="stop"))
    wire += answer_.end(exchange)
    calls, reasons = {}, {}
    for obj in sse_objects(wire):
        for choice in obj["choices"]:
            for call in choice["delta"].get("tool_calls", []):
                calls[choice["index"]] = json.loads(call["function"]["arguments"])["city"]
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    assert calls == {0: "Oslo", 1: "Rome"} and reasons == {0: "tool_calls", 1: "tool_calls"}
