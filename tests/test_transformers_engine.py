"""The transformers engine on the embedded SmolLM2-135M-Instruct GGUF (real weights, CPU).

The model is loaded once for the module; generations are kept to a few tokens.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model needs no hub; never try it

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage, EngineError  # noqa: E402
from serve_app.engines.detokenizer import IncrementalDetokenizer  # noqa: E402
from serve_app.engines.kv_cache import keep_rows, merge_rows  # noqa: E402
from serve_app.engines.sampling import (  # noqa: E402
    filter_logits,
    sample_token,
    sample_tokens,
    stop_reason,
)
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
    resolve_model_source,
)
from serve_app.model_contract import AnswerChunk, GenerationRequest, SlotAcquired  # noqa: E402
from serve_app.model_deployment import answer_stream  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=16)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 2+2?",
    "Name three colors.",
    "Who wrote Hamlet?",
    "Say hello in Japanese.",
    "What is Python?",
    "Describe a cat in one sentence.",
]


@pytest.fixture(scope="module")
def engine(smollm2_engine: TransformersEngine) -> TransformersEngine:
    return smollm2_engine


@pytest.fixture(scope="module")
def formatter() -> TransformersPromptFormatter:
    return TransformersPromptFormatter(ChatStreamConfig())


def prompt_for(formatter: TransformersPromptFormatter, question: str) -> str:
    return formatter.render([ChatMessage("user", question)])


def stream(engine: TransformersEngine, prompt, params: GenerationParams, **request):
    return engine.stream(GenerationRequest(prompt, params, **request))


async def collect(engine: TransformersEngine, prompt, params: GenerationParams, **request) -> str:
    return "".join([chunk.text async for chunk in stream(engine, prompt, params, **request)])


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


# --- model source ------------------------------------------------------------------------------


def test_resolve_model_source_variants(tmp_path: Path) -> None:
    directory, gguf = resolve_model_source(ChatStreamConfig())
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(directory) / gguf).is_file()
    assert resolve_model_source(ChatStreamConfig(model=str(tmp_path / "m.Q8_0.gguf"))) == (
        str(tmp_path),
        "m.Q8_0.gguf",
    )
    assert resolve_model_source(ChatStreamConfig(model="org/model")) == ("org/model", None)
    assert resolve_model_source(ChatStreamConfig(model="org/model", gguf_file="x.gguf")) == (
        "org/model",
        "x.gguf",
    )


# --- pure helpers ------------------------------------------------------------------------------


def test_stop_reason_order() -> None:
    eos = frozenset({2})
    assert stop_reason(2, 1, 10, 5, eos, 100) == "eos"
    assert stop_reason(7, 5, 10, 5, eos, 100) == "length"
    assert stop_reason(7, 3, 97, 5, eos, 100) == "context"
    assert stop_reason(7, 2, 97, 5, eos, 100) is None


def test_sampling_filters() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert sample_token(logits, GenerationParams(temperature=0.0)) == 1
    assert sample_token(logits, GenerationParams(temperature=1.5, top_k=1)) == 1
    batch = torch.stack([logits, -logits])
    greedy = SimpleNamespace(params=GenerationParams(temperature=0.0), generator=None)
    sampled = SimpleNamespace(params=GenerationParams(temperature=1.0, top_k=1), generator=None)
    assert sample_tokens(batch, [greedy, sampled]) == [1, 3]
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, True, False]
    # The best token alone holds ~63% of the mass here: top_p 0.5 keeps only it.
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [False, True, False, False]


def test_cache_rows_merge_and_leave() -> None:
    def cache_of(*lengths_and_values):
        keys = [torch.full((1, 1, n, 2), float(v)) for n, v in lengths_and_values]
        layer = SimpleNamespace(keys=torch.cat(keys), values=torch.cat(keys).clone())
        return SimpleNamespace(layers=[layer])

    batch = cache_of((2, 1.0))
    mask = merge_rows(
        batch,
        torch.ones(1, 2, dtype=torch.long),
        cache_of((4, 2.0)),
        torch.ones(1, 4, dtype=torch.long),
    )
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.layers[0].keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 2, 2]]
    # The long row leaves: the columns that were only its own are trimmed away.
    mask = keep_rows(batch, mask, torch.tensor([0]))
    assert mask.tolist() == [[1, 1]]
    assert batch.layers[0].keys[:, 0, :, 0].tolist() == [[1, 1]]


def test_incremental_detokenizer_handles_multibyte_text(engine: TransformersEngine) -> None:
    text = "Café — 日本語のテキスト 🙂👍🏽 naïve\n  spaced   words"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(engine.tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == engine.tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # streamed piece by piece, not all at the end


# --- the real model ----------------------------------------------------------------------------


def test_formatter_renders_chat_template(formatter: TransformersPromptFormatter) -> None:
    prompt = prompt_for(formatter, "What is the capital of France?")
    assert "What is the capital of France?" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert 10 < formatter.count_tokens(prompt) < 60
    assert formatter.context_length == 8192
    short = TransformersPromptFormatter(ChatStreamConfig(max_context_tokens=512))
    assert short.context_length == 512


async def test_streams_a_short_real_answer(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    prompt = prompt_for(formatter, "What is the capital of France?")
    chunks = [
        c async for c in stream(engine, prompt, GenerationParams(temperature=0, max_new_tokens=8))
    ]
    assert all(isinstance(c, AnswerChunk) for c in chunks)
    assert len(chunks) > 1  # streamed, not one block
    assert "Paris" in "".join(c.text for c in chunks)
    assert 1 <= sum(c.num_tokens for c in chunks) <= 8
    assert engine.running == 0


async def test_sampled_generation_respects_max_new_tokens(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    params = GenerationParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=5)
    chunks = [c async for c in stream(engine, prompt_for(formatter, "Tell me a story."), params)]
    assert 1 <= sum(c.num_tokens for c in chunks) <= 5


async def test_prompt_over_the_context_is_an_engine_error(engine: TransformersEngine) -> None:
    with pytest.raises(EngineError, match="does not fit the context"):
        await collect(engine, "word " * 9000, GREEDY)
    assert engine.running == 0


async def test_greedy_output_is_identical_alone_and_beside_seven_others(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    prompts = [prompt_for(formatter, q) for q in QUESTIONS]
    alone = [await collect(engine, p, GREEDY) for p in prompts]
    assert all(alone)

    steps_before = engine.scheduler.steps
    together = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    assert together == alone
    # They really shared forward passes: ~16 tokens each took far fewer than 8 x 15 steps.
    assert engine.scheduler.steps - steps_before < 2 * 16

    # Again, arriving while another stream is mid-decode: they wait for the step to end, share
    # one left-padded prefill, and join a batch that already has a (longer) row.
    blocker = stream(engine, prompt_for(formatter, "Tell me a long story."), GenerationParams(
        temperature=0.0, max_new_tokens=200))  # fmt: skip
    await anext(blocker)
    passes_before = engine.scheduler.prefill_passes
    together = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    await blocker.aclose()
    assert together == alone
    assert engine.scheduler.prefill_passes - passes_before < len(prompts)


async def test_cancelled_stream_leaves_within_one_step_and_others_continue(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    long = GenerationParams(temperature=0.0, max_new_tokens=400)
    others_params = GenerationParams(temperature=0.0, max_new_tokens=24)
    victim_chunks: list[str] = []

    async def victim() -> None:
        async for chunk in stream(engine, prompt_for(formatter, "Tell me a long story."), long):
            victim_chunks.append(chunk.text)

    victim_task = asyncio.create_task(victim())
    others = [
        asyncio.create_task(collect(engine, prompt_for(formatter, q), others_params))
        for q in QUESTIONS[:2]
    ]
    await wait_until(lambda: len(victim_chunks) >= 3 and engine.running == 3)

    steps_at_cancel = engine.scheduler.steps
    victim_task.cancel()
    await wait_until(lambda: engine.running == 2)
    reason, left_at_step = engine.scheduler.last_finished
    assert reason == "cancelled"
    assert left_at_step - steps_at_cancel <= 1
    with pytest.raises(asyncio.CancelledError):
        await victim_task

    answers = await asyncio.gather(*others)
    assert all(answers)
    assert engine.running == 0


async def test_closed_generator_frees_its_slot(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    counting = stream(
        engine,
        prompt_for(formatter, "Count to one hundred."),
        GenerationParams(temperature=0.0, max_new_tokens=400),
    )
    await anext(counting)
    assert engine.running == 1
    steps_at_close = engine.scheduler.steps
    await counting.aclose()
    await wait_until(lambda: engine.running == 0)
    reason, left_at_step = engine.scheduler.last_finished
    assert reason == "cancelled"
    assert left_at_step - steps_at_close <= 1


class FailingDecode:
    """The real model, except that every decode step (a pass over a non-empty cache) raises."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.generation_config = model.generation_config

    def __call__(self, **kwargs):
        if kwargs["past_key_values"].get_seq_length() > 0:
            raise RuntimeError("boom")
        return self.model(**kwargs)


async def test_model_failure_is_an_engine_error_and_stop_is_reported(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    failing = TransformersEngine(ChatStreamConfig())
    failing.start_with(FailingDecode(engine.model), engine.tokenizer, "cpu", 8192)
    chunks = []
    with pytest.raises(EngineError, match="decode step failed"):
        async for chunk in stream(failing, prompt_for(formatter, "Hi!"), GREEDY):
            chunks.append(chunk)
    assert len(chunks) == 1  # the prefill's token came out before the failing step
    assert failing.running == 0
    await failing.check_health()  # one failed step does not kill the worker

    failing.shutdown()
    with pytest.raises(EngineError):
        await failing.check_health()
    with pytest.raises(EngineError, match="stopped"):
        await collect(failing, prompt_for(formatter, "Hi!"), GREEDY)


async def test_run_on_model_thread_uses_the_worker_thread(engine: TransformersEngine) -> None:
    assert await engine.run_on_model_thread(lambda: threading.current_thread().name) == (
        "transformers-engine"
    )
    with pytest.raises(ZeroDivisionError):
        await engine.run_on_model_thread(lambda: 1 / 0)


# --- the model contract: finish reasons, token ids, prompt tokens, stop strings, seeds ---------


def ids_prompt(formatter: TransformersPromptFormatter, question: str) -> list[int]:
    """What the ingress sends this engine: token ids (engines/chat_tokens.py)."""
    return formatter.model_input([ChatMessage("user", question)])


async def test_finish_reason_stop_and_token_ids_that_encode_the_text(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    params = GenerationParams(temperature=0.0, max_new_tokens=64)
    for question in ("What is the capital of France?", "Name three colors."):
        chunks = [c async for c in stream(engine, ids_prompt(formatter, question), params)]
        text = "".join(c.text for c in chunks)
        ids = [i for c in chunks for i in c.token_ids]
        # The answer ended by itself (end of sequence) well within the budget: "stop", on the
        # last chunk only.
        assert chunks[-1].finish_reason == "stop"
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert all(c.num_tokens == len(c.token_ids) for c in chunks)
        assert 0 < len(ids) < 64 and engine.tokenizer.eos_token_id not in ids
        assert engine.tokenizer.decode(ids, skip_special_tokens=True) == text
        assert engine.tokenizer(text, add_special_tokens=False)["input_ids"] == ids


async def test_finish_reason_length_for_the_budget_and_the_context(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    prompt = ids_prompt(formatter, "Tell me a long story.")
    chunks = [
        c async for c in stream(engine, prompt, GenerationParams(temperature=0, max_new_tokens=4))
    ]
    assert chunks[-1].finish_reason == "length"
    assert sum(c.num_tokens for c in chunks) == 4
    assert all(c.finish_reason is None for c in chunks[:-1])

    # The context ends three tokens after the prompt: "length" too.
    short = TransformersEngine(ChatStreamConfig())
    short.start_with(engine.model, engine.tokenizer, "cpu", len(prompt) + 3)
    try:
        params = GenerationParams(temperature=0.0, max_new_tokens=64)
        chunks = [c async for c in stream(short, prompt, params)]
        assert chunks[-1].finish_reason == "length"
        assert sum(c.num_tokens for c in chunks) == 3
    finally:
        short.shutdown()


class EndsAtOnce:
    """The real model, except that the end-of-sequence token always wins."""

    def __init__(self, model, eos_id: int) -> None:
        self.model, self.eos_id = model, eos_id
        self.config = model.config
        self.generation_config = model.generation_config

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[:, -1, self.eos_id] = float("inf")
        return out


async def test_an_empty_answer_is_one_empty_last_chunk(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    silent = TransformersEngine(ChatStreamConfig())
    silent.start_with(
        EndsAtOnce(engine.model, engine.tokenizer.eos_token_id), engine.tokenizer, "cpu", 8192
    )
    try:
        chunks = [c async for c in stream(silent, ids_prompt(formatter, "Hi!"), GREEDY)]
        assert chunks == [AnswerChunk("", 0, (), "stop")]
        assert silent.running == 0
    finally:
        silent.shutdown()


async def test_prompt_tokens_as_the_engine_sees_them(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    ids = ids_prompt(formatter, "What is 2+2?")
    text = prompt_for(formatter, "What is 2+2?")
    assert engine.prompt_tokens(ids) == len(ids)
    assert engine.prompt_tokens(text) == formatter.count_tokens(text)
    request = GenerationRequest(ids, GenerationParams(temperature=0.0, max_new_tokens=2))
    items = [item async for item in answer_stream(engine, request)]
    assert items[0] == SlotAcquired(prompt_tokens=len(ids))
    assert items[-1].finish_reason == "length"


async def test_stop_strings_cut_the_answer_and_free_the_slot(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    prompt = ids_prompt(formatter, "What is the capital of France?")
    params = GenerationParams(temperature=0.0, max_new_tokens=64)
    whole = await collect(engine, prompt, params)
    assert "Paris" in whole

    request = GenerationRequest(prompt, params, stop=("Paris", "never said"))
    items = [item async for item in answer_stream(engine, request)]
    chunks = items[1:]
    text = "".join(c.text for c in chunks)
    assert text == whole[: whole.index("Paris")]
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    ids = [i for c in chunks for i in c.token_ids]
    assert sum(c.num_tokens for c in chunks) == len(ids)
    assert text.startswith(engine.tokenizer.decode(ids))  # tokens of the text sent, no more
    # The engine's stream was closed at the match: the request leaves before its next step.
    await wait_until(lambda: engine.running == 0)
    assert engine.scheduler.last_finished[0] == "cancelled"

    # A stop string that never comes changes nothing.
    unmatched = GenerationRequest(prompt, params, stop=("never said",))
    items = [item async for item in answer_stream(engine, unmatched)]
    assert "".join(c.text for c in items[1:]) == whole
    assert items[-1].finish_reason == "stop"


async def test_a_seed_samples_the_same_answer_alone_and_in_a_batch(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    sampled = GenerationParams(temperature=1.0, max_new_tokens=16)
    story = ids_prompt(formatter, "Tell me a story about a fox.")
    alone = await collect(engine, story, sampled, seed=1234)
    assert alone
    together = await asyncio.gather(
        collect(engine, story, sampled, seed=1234),
        collect(engine, ids_prompt(formatter, "What is Python?"), sampled),  # unseeded, sampled
        collect(engine, ids_prompt(formatter, "Who wrote Hamlet?"), GREEDY),
        collect(engine, story, sampled, seed=1234),
        collect(engine, story, sampled, seed=99),
        collect(engine, story, sampled, seed=7),
    )
    assert together[0] == together[3] == alone
    # Other seeds sample other answers (two of them, so that a coincidence cannot fail this).
    assert together[4] != alone or together[5] != alone
    # Greedy rows are unaffected by the seeded rows beside them.
    hamlet = ids_prompt(formatter, "Who wrote Hamlet?")
    assert together[2] == await collect(engine, hamlet, GREEDY)


# --- chunked prefill ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked(engine: TransformersEngine) -> tuple[TransformersEngine, list]:
    """A second engine on the same weights whose prefill runs 16 prompt tokens per row and pass
    (every prompt here needs several passes); `passes` records each forward pass."""
    passes: list[tuple[str, int, int]] = []
    chunked = TransformersEngine(ChatStreamConfig(max_ongoing_requests=9))
    chunked.start_with(
        engine.model,
        engine.tokenizer,
        "cpu",
        8192,
        prefill_chunk_tokens=16,
        on_pass=lambda *p: passes.append(p),
    )
    yield chunked, passes
    chunked.shutdown()


async def test_chunked_prefill_gives_the_same_greedy_answers_alone_and_batched(
    engine: TransformersEngine, formatter: TransformersPromptFormatter, chunked
) -> None:
    chunked_engine, passes = chunked
    prompts = [prompt_for(formatter, q) for q in QUESTIONS]
    unchunked_alone = [await collect(engine, p, GREEDY) for p in prompts]

    passes.clear()
    alone = [await collect(chunked_engine, p, GREEDY) for p in prompts]
    assert alone == unchunked_alone
    assert sum(kind == "prefill" for kind, _, _ in passes) >= 2 * len(prompts)  # really chunked

    together = await asyncio.gather(*(collect(chunked_engine, p, GREEDY) for p in prompts))
    assert together == alone


async def test_arrivals_do_not_stall_a_decoding_stream(
    formatter: TransformersPromptFormatter, chunked
) -> None:
    """Eight newcomers join a stream that is decoding: between two of its decode steps there is
    at most one prefill pass of at most one chunk per row, and the newcomers share the passes."""
    chunked_engine, passes = chunked
    long = GenerationParams(temperature=0.0, max_new_tokens=300)
    blocker = stream(chunked_engine, prompt_for(formatter, "Tell me a long story."), long)
    await anext(blocker)
    passes.clear()
    answers = await asyncio.gather(
        *(collect(chunked_engine, prompt_for(formatter, q), GREEDY) for q in QUESTIONS)
    )
    await blocker.aclose()
    assert all(answers)
    prefills = [p for p in passes if p[0] == "prefill"]
    assert prefills and all(tokens <= 16 for _, tokens, _ in prefills)
    for before, after in zip(passes, passes[1:], strict=False):
        if before[0] == after[0] == "prefill":
            assert after[2] == 0, f"two prefill chunks in a row while a stream decoded: {passes}"
    # Arrivals share passes: far fewer than 8 prompts x (30+ tokens / 16) passes each.
    assert len(prefills) < sum(formatter.count_tokens(prompt_for(formatter, q)) for q in QUESTIONS)


# --- one bad row fails one request -------------------------------------------------------------


class PoisonedRows:
    """The real model, except that rows whose input holds `token_id` get NaN logits."""

    def __init__(self, model, token_id: int) -> None:
        self.model, self.token_id = model, token_id
        self.config = model.config
        self.generation_config = model.generation_config

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        for row, ids in enumerate(kwargs["input_ids"]):
            if bool((ids == self.token_id).any()):
                out.logits[row] = float("nan")
        return out


async def test_a_failing_row_fails_only_its_own_request(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    marker = engine.tokenizer(" zebra", add_special_tokens=False)["input_ids"][-1]
    poisoned = TransformersEngine(ChatStreamConfig(max_ongoing_requests=4))
    poisoned.start_with(PoisonedRows(engine.model, marker), engine.tokenizer, "cpu", 8192)
    try:
        # Started together, so they share the prefill whose sampling fails for one row.
        sampled = GenerationParams(temperature=1.0, max_new_tokens=8)
        bad, good = await asyncio.gather(
            collect(poisoned, prompt_for(formatter, "Tell me about a zebra"), sampled),
            collect(poisoned, prompt_for(formatter, "What is the capital of France?"), GREEDY),
            return_exceptions=True,
        )
        assert isinstance(bad, EngineError) and "sampling failed" in str(bad)
        assert "Paris" in good
        await poisoned.check_health()  # the worker survived
        assert await collect(poisoned, prompt_for(formatter, "What is 2+2?"), GREEDY)
        assert poisoned.running == 0
    finally:
        poisoned.shutdown()
