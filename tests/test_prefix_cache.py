"""Sessions' KV prefixes kept between turns (engines/prefix_cache.py): the LRU on its own, then
the transformers engine on the embedded SmolLM2-135M with and without reuse: identical greedy
answers in float32, teacher-forced top-1 agreement in bfloat16."""

from __future__ import annotations

import asyncio
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.hf_loading import apply_precision  # noqa: E402
from serve_app.engines.kv_cache import new_cache  # noqa: E402
from serve_app.engines.prefix_cache import (  # noqa: E402
    KeptPrefix,
    PrefixCache,
    common_prefix_length,
    group_cache,
    reusable_length,
)
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)
from serve_app.model_contract import GenerationRequest  # noqa: E402
from tests.support import teacher_forced_matches  # noqa: E402


def prefix(ids: list[int], per_token: int = 4) -> KeptPrefix:
    """A one-layer prefix of `per_token` float32 bytes... times 2 (keys and values) a token."""
    kv = torch.zeros(1, 1, len(ids), per_token // 4)
    return KeptPrefix(list(ids), [(kv, kv.clone())])


# --- the LRU -----------------------------------------------------------------------------------


def test_only_a_common_prefix_is_reused_and_the_rest_dropped() -> None:
    cache = PrefixCache(budget_bytes=10_000)
    cache.put("s", prefix([1, 2, 3, 4, 5]))
    taken = cache.take("s", [1, 2, 9, 9])  # a regenerate / an edited turn: only [1, 2] match
    assert taken.ids == [1, 2] and taken.layers[0][0].shape[2] == 2
    assert "s" not in cache and cache.nbytes == 0  # taken out while the turn runs

    cache.put("s", prefix([1, 2, 3]))
    assert cache.take("s", [7, 8, 9]) is None  # a cleared conversation: nothing in common
    assert "s" not in cache

    cache.put("s", prefix([1, 2, 3]))
    assert cache.take("s", [1, 2, 3]).ids == [1, 2]  # the last prompt token always runs
    assert reusable_length([1, 2, 3], [1, 2, 3, 4, 5]) == 3
    assert cache.take("other", [1, 2]) is None


def test_lru_stays_within_its_byte_budget() -> None:
    one = prefix([1] * 10).nbytes  # 10 tokens x 2 tensors x 4 bytes = 80 bytes
    cache = PrefixCache(budget_bytes=3 * one)
    for session in "abc":
        cache.put(session, prefix([1] * 10))
    cache.take("a", [1] * 20)  # a is used (and put back below): b is now the oldest
    cache.put("a", prefix([1] * 10))
    cache.put("d", prefix([1] * 10))
    assert "b" not in cache and {"a", "c", "d"} <= {s for s in "abcd" if s in cache}
    assert cache.nbytes <= cache.budget_bytes and cache.evictions == 1
    cache.put("big", prefix([1] * 40))  # larger than the whole budget: not kept, none evicted
    assert "big" not in cache and len(cache) == 3
    cache.put("a", prefix([1] * 5))  # replacing a session's prefix frees the old one
    assert cache.nbytes == 2 * one + one // 2


# --- the engine, float32 ------------------------------------------------------------------------

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
TURNS = [
    "Tell me about the sea in two sentences.",
    "Now say something about mountains.",
    "And what about rivers?",
]


@pytest.fixture(scope="module")
def engines():
    """A float32 engine that keeps prefixes (prefill chunks of 16 tokens, so reuse meets chunked
    prefill) and one on the same weights that never does; `passes` records the first's."""
    config = ChatStreamConfig(dtype="float32", max_ongoing_requests=8)
    plain = TransformersEngine(config.model_copy(update={"prefix_cache_mb": 0}))
    asyncio.run(plain.start())
    passes: list[tuple[str, int, int]] = []
    reusing = TransformersEngine(config)
    reusing.start_with(
        plain.model,
        plain.tokenizer,
        "cpu",
        8192,
        prefill_chunk_tokens=16,
        on_pass=lambda *p: passes.append(p),
    )
    assert plain.scheduler.prefix_cache is None and reusing.scheduler.prefix_cache is not None
    yield plain, reusing, passes
    reusing.shutdown()
    plain.shutdown()


@pytest.fixture(scope="module")
def formatter() -> TransformersPromptFormatter:
    return TransformersPromptFormatter(ChatStreamConfig())


async def answer(engine: TransformersEngine, prompt, session: str | None = None) -> str:
    request = GenerationRequest(prompt, GREEDY, session=session)
    return "".join([chunk.text async for chunk in engine.stream(request)])


def prefilled(passes: list) -> int:
    return sum(n for kind, n, _ in passes if kind == "prefill")


async def conversation(
    engine: TransformersEngine, formatter, session: str | None, turns: list[str], passes=None
) -> list[tuple[str, int, int]]:
    """(answer, prompt tokens, prompt tokens prefilled) per turn."""
    messages: list[ChatMessage] = []
    out = []
    for question in turns:
        messages.append(ChatMessage("user", question))
        prompt = formatter.model_input(messages)
        if passes is not None:
            passes.clear()
        text = await answer(engine, prompt, session)
        out.append((text, len(prompt), prefilled(passes) if passes is not None else 0))
        messages.append(ChatMessage("assistant", text))
    return out


@pytest.mark.slow
async def test_greedy_float32_answers_are_identical_with_and_without_reuse(
    engines, formatter
) -> None:
    plain, reusing, passes = engines
    without = await conversation(plain, formatter, None, TURNS)
    with_reuse = await conversation(reusing, formatter, "chat-1", TURNS, passes)
    assert [t for t, _, _ in with_reuse] == [t for t, _, _ in without]
    assert all(text for text, _, _ in without)
    # Turn 1 prefills all of its prompt; later turns only what they add to the history.
    assert with_reuse[0][2] == with_reuse[0][1]
    for (_, previous, _), (_, tokens, ran) in zip(with_reuse, with_reuse[1:], strict=False):
        assert ran < tokens - previous  # not even the previous prompt is prefilled again
    kept = reusing.scheduler.prefix_cache.peek("chat-1")
    assert kept is not None and len(kept.ids) > with_reuse[-1][1]  # prompt + answer

    # Several sessions at once, each reusing a prefix of its own length, beside a request
    # without a session: one left-padded group, the same answers as alone without reuse.
    await conversation(reusing, formatter, "chat-2", TURNS[:1])
    follow = [TURNS[:2], TURNS[:3], ["What is 2+2?"]]
    alone = [await conversation(plain, formatter, None, turns) for turns in follow]
    together = await asyncio.gather(
        *(
            conversation(reusing, formatter, session, turns)
            for session, turns in zip(["chat-2", "chat-1", None], follow, strict=True)
        )
    )
    assert [[t for t, _, _ in c] for c in together] == [[t for t, _, _ in c] for c in alone]


@pytest.mark.slow
async def test_regenerate_and_clear_reuse_only_what_still_matches(engines, formatter) -> None:
    plain, reusing, passes = engines
    first = await conversation(reusing, formatter, "chat-r", TURNS[:2], passes)
    history = [
        ChatMessage("user", TURNS[0]),
        ChatMessage("assistant", first[0][0]),
        ChatMessage("user", TURNS[1]),
    ]
    prompt = formatter.model_input(history)

    # Regenerate: the same prompt again; the old answer's KV is dropped, the prompt reused.
    passes.clear()
    again = await answer(reusing, prompt, "chat-r")
    assert again == await answer(plain, prompt) == first[1][0]
    assert prefilled(passes) == 1  # only the prompt's last token ran through the model
    kept = reusing.scheduler.prefix_cache.peek("chat-r").ids
    assert kept[: len(prompt)] == prompt

    # Clear: a new conversation under the same session reuses at most the shared template head.
    fresh = formatter.model_input([ChatMessage("user", "Name three colors.")])
    passes.clear()
    assert await answer(reusing, fresh, "chat-r") == await answer(plain, fresh)
    # Only the head both conversations share (the template's system prompt) is reused.
    assert 0 < prefilled(passes) == len(fresh) - common_prefix_length(prompt, fresh)
    kept = reusing.scheduler.prefix_cache.peek("chat-r").ids
    assert kept[: len(fresh)] == fresh  # nothing of the old conversation is left

    # A cut answer: the stream is closed after its first chunk; what was fed is kept and the
    # next turn (with the cut text in its history) reuses only what matches.
    request = GenerationRequest(prompt, GREEDY, session="chat-r")
    chunks = reusing.stream(request)
    cut = (await anext(chunks)).text
    await chunks.aclose()
    following = formatter.model_input(
        [*history, ChatMessage("assistant", cut), ChatMessage("user", TURNS[2])]
    )
    assert await answer(reusing, following, "chat-r") == await answer(plain, following)


# --- the engine, bfloat16 -----------------------------------------------------------------------

BF16_ANSWER = GenerationParams(temperature=0.0, max_new_tokens=32)
CHATS = [
    ["Tell me about the sea.", "Why is it salty?", "And why is it blue?"],
    ["Give me a tip for learning to cook.", "What should I cook first?", "How long does it take?"],
    ["Explain how a bicycle stays upright.", "What about a motorcycle?", "Which is safer?"],
    ["What is a prime number?", "Name the first five.", "Why do they matter?"],
]


@pytest.fixture(scope="module")
def bf16_engines(engines):
    """The float32 weights cast as `dtype="bfloat16"` loads them (its float32 LM-head
    rescoring included), one engine that keeps prefixes and one that never does."""
    plain32 = engines[0]
    model = apply_precision(copy.deepcopy(plain32.model), "bfloat16", "none")
    config = ChatStreamConfig(dtype="bfloat16", max_ongoing_requests=8)
    plain = TransformersEngine(config.model_copy(update={"prefix_cache_mb": 0}))
    plain.start_with(model, plain32.tokenizer, "cpu", 8192)
    reusing = TransformersEngine(config)
    reusing.start_with(model, plain32.tokenizer, "cpu", 8192)
    yield model, plain, reusing
    reusing.shutdown()
    plain.shutdown()


def top1_after_each_token(model, ids: list[int], kept: KeptPrefix | None) -> list[int]:
    """The model's top-1 token after each prefix `ids[: i + 1]` (teacher forcing), in one pass;
    from `kept`'s KV for its tokens when given (those positions are -1, never compared)."""
    start, cache = 0, None
    if kept is not None:
        assert kept.ids == ids[: len(kept.ids)]
        start = len(kept.ids)
        cache, _ = group_cache(new_cache(model), [kept], "cpu")
    with torch.inference_mode():
        logits = model(
            input_ids=torch.tensor([ids[start:]]), past_key_values=cache, use_cache=True
        ).logits[0]
    return [-1] * start + logits.argmax(-1).tolist()


async def chat_keeping_snapshots(engine: TransformersEngine, formatter, session: str, turns):
    """Each turn's prompt and, from turn 2 on, the KV prefix the engine kept for it (what the
    turn reuses), read on the worker thread, so after the previous turn put it back."""
    messages: list[ChatMessage] = []
    out = []
    for question in turns:
        kept = await engine.run_on_model_thread(lambda: engine.scheduler.prefix_cache.peek(session))
        messages.append(ChatMessage("user", question))
        prompt = formatter.model_input(messages)
        if kept is not None:
            out.append((prompt, kept.truncated(reusable_length(kept.ids, prompt))))
        messages.append(ChatMessage("assistant", await bf16_answer(engine, prompt, session)))
    return out


async def bf16_answer(engine: TransformersEngine, prompt: list[int], session=None) -> str:
    request = GenerationRequest(prompt, BF16_ANSWER, session=session)
    return "".join([chunk.text async for chunk in engine.stream(request)])


async def answer_ids(engine: TransformersEngine, prompt: list[int]) -> list[int]:
    request = GenerationRequest(prompt, BF16_ANSWER)
    return [t async for chunk in engine.stream(request) for t in chunk.token_ids]


@pytest.mark.slow
async def test_bfloat16_turns_with_reuse_agree_with_turns_without(bf16_engines, formatter) -> None:
    """Turns 2 and 3 of four chats (chunked prefill, the default chunks): the reference is
    each turn answered without reuse; reading it teacher-forced from the KV prefix the engine
    kept (history computed in earlier turns, answers decoded step by step) must pick the same
    top-1 token as reading it from scratch at >= 99 % of the answer tokens."""
    model, plain, reusing = bf16_engines
    # One request after the other: batched bf16 products round differently with the batch's
    # shape, so requests at once would make the count vary from run to run (by 1-2 tokens in
    # 240); the float32 test above covers reuse in a batch exactly.
    turns = []
    for i, chat in enumerate(CHATS):
        turns += await chat_keeping_snapshots(reusing, formatter, f"bf16-{i}", chat)
    assert len(turns) == len(CHATS) * 2 and all(len(kept.ids) > 20 for _, kept in turns)
    answers = [await answer_ids(plain, prompt) for prompt, _ in turns]

    with_reuse = without = same = total = 0
    for (prompt, kept), answer in zip(turns, answers, strict=True):
        ids = prompt + answer
        reused = top1_after_each_token(model, ids, kept)
        fresh = top1_after_each_token(model, ids, None)
        with_reuse += teacher_forced_matches(reused, ids, len(prompt))[0]
        without += teacher_forced_matches(fresh, ids, len(prompt))[0]
        last = range(len(prompt) - 1, len(ids) - 1)
        same += sum(reused[p] == fresh[p] for p in last)
        total += len(answer)
    print(
        f"bf16 teacher-forced top-1 over {total} answer tokens: with reuse {with_reuse}, "
        f"without {without}; with == without at {same}"
    )
    assert total >= len(turns) * 8
    # The target: reuse changes the top-1 token at < 1 % of the answer tokens (measured here:
    # 238/240).
    assert same / total >= 0.99, f"{same}/{total}"
    # Against the reference answer itself, which the engine decoded step by step: a one-pass
    # read differs from that at 1-2 % of tokens even without reuse (measured: with reuse
    # 237/240, without 237/240), so this bound leaves that room.
    assert with_reuse / total >= 0.98 and with_reuse >= without - 0.01 * total, (
        f"{with_reuse}/{total}, without reuse {without}"
    )
