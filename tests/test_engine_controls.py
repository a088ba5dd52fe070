"""OpenAI's sampling controls and structured outputs in the transformers engine, with the real
embedded SmolLM2 model: what a client asks for is what it gets, alone and in a batch."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter

import jsonschema
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.features import ENGINE_FEATURES, unsupported_features  # noqa: E402
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)
from serve_app.model_contract import AnswerChunk, GenerationRequest, OutputConstraint  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=24)
SAMPLED = GenerationParams(temperature=1.0, max_new_tokens=64)


@pytest.fixture(scope="module")
def engine(smollm2_engine: TransformersEngine) -> TransformersEngine:
    return smollm2_engine


@pytest.fixture(scope="module")
def formatter() -> TransformersPromptFormatter:
    return TransformersPromptFormatter(ChatStreamConfig())


@pytest.fixture
def ask(engine: TransformersEngine, formatter: TransformersPromptFormatter):
    async def ask(question: str, params: GenerationParams = GREEDY, **fields) -> AnswerChunk:
        prompt = formatter.model_input([ChatMessage("user", question)])
        request = GenerationRequest(prompt, params, **fields)
        assert unsupported_features("transformers", request) == []
        chunks = [chunk async for chunk in engine.stream(request)]
        assert all(c.finish_reason is None for c in chunks[:-1])
        return AnswerChunk(
            "".join(c.text for c in chunks),
            sum(c.num_tokens for c in chunks),
            tuple(t for c in chunks for t in c.token_ids),
            chunks[-1].finish_reason,
            tuple(lp for c in chunks for lp in c.logprobs),
        )

    return ask


def test_the_engine_row_lists_what_it_honours() -> None:
    assert ENGINE_FEATURES["transformers"] == {
        "ignore_eos",
        "min_tokens",
        "penalties",
        "logit_bias",
        "logprobs",
        "json_object",
        "json_schema",
    }


async def test_ignore_eos_and_min_tokens_set_the_length(ask) -> None:
    plain = await ask("What is 2+2?")
    assert plain.finish_reason == "stop" and plain.num_tokens < 16
    fixed = await ask("What is 2+2?", ignore_eos=True)
    assert (fixed.finish_reason, fixed.num_tokens) == ("length", GREEDY.max_new_tokens)
    at_least = await ask("What is 2+2?", min_tokens=plain.num_tokens + 4)
    assert at_least.num_tokens >= plain.num_tokens + 4
    assert at_least.text.startswith(plain.text.rstrip("."))


async def test_logprobs_cover_every_token_with_its_text(ask) -> None:
    answer = await ask("What is the capital of France?", logprobs=3)
    assert len(answer.logprobs) == answer.num_tokens == len(answer.token_ids)
    assert "".join(lp.token for lp in answer.logprobs) == answer.text
    for lp, token_id in zip(answer.logprobs, answer.token_ids, strict=True):
        assert lp.token_id == token_id and lp.logprob <= 0.0
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].token_id == token_id  # greedy: the chosen one is the likeliest
        assert lp.top[0].logprob == pytest.approx(lp.logprob)
    chosen_only = await ask("What is the capital of France?", logprobs=0)
    assert chosen_only.text == answer.text and all(lp.top == () for lp in chosen_only.logprobs)
    assert (await ask("What is the capital of France?")).logprobs == ()


async def test_logit_bias_bans_a_token(ask, formatter: TransformersPromptFormatter) -> None:
    plain = await ask("What is the capital of France?")
    paris = formatter.tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1 and paris[0] in plain.token_ids
    banned = await ask("What is the capital of France?", logit_bias=((paris[0], -100.0),))
    assert paris[0] not in banned.token_ids


async def test_a_frequency_penalty_curbs_repetition(ask) -> None:
    question = "Write the word 'apple' twenty times, separated by spaces."
    params = GenerationParams(temperature=0.0, max_new_tokens=48)
    plain = await ask(question, params, ignore_eos=True)
    penalised = await ask(
        question, params, ignore_eos=True, frequency_penalty=2.0, presence_penalty=0.5
    )
    most = Counter(plain.token_ids).most_common(1)[0][1]
    assert most >= 6  # the model repeats itself
    assert Counter(penalised.token_ids).most_common(1)[0][1] < most


async def test_a_plain_greedy_row_is_unchanged_beside_rows_with_controls(ask) -> None:
    alone = await ask("Who wrote Hamlet?")
    together = await asyncio.gather(
        ask("Who wrote Hamlet?"),
        ask("Name three colors.", logprobs=2, frequency_penalty=1.0),
        ask("What is Python?", ignore_eos=True),
        ask("Describe a cat.", constraint=OutputConstraint("json_object")),
    )
    assert together[0].text == alone.text
    assert together[2].num_tokens == GREEDY.max_new_tokens


# --- structured outputs ------------------------------------------------------------------------

# Every string, array and integer is bounded, so the grammar's longest value fits the budget:
# each answer ends complete ("stop") because of the constraint. Unbounded schemas (and
# json_object) can run out of budget mid-value: see test_a_budget_that_ends_mid_value...
NAME = {"type": "string", "maxLength": 24}
PERSON = {
    "type": "object",
    "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"sky": {"enum": ["sunny", "cloudy", "rainy"]}, "windy": {"type": "boolean"}},
    "required": ["sky", "windy"],
    "additionalProperties": False,
}
SHOPPING = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
    "required": ["items"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "customer": PERSON,
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "product": NAME,
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["product", "qty"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["customer", "lines"],
    "additionalProperties": False,
}
CASES = [
    ("Describe a person.", PERSON),
    ("What is the weather like?", WEATHER),
    ("What should I buy at the market?", SHOPPING),
    ("Write an order for a shop.", ORDER),
]


@pytest.mark.parametrize(("question", "schema"), CASES, ids=["object", "enum", "array", "nested"])
async def test_json_schema_answers_always_validate(ask, question: str, schema: dict) -> None:
    constraint = OutputConstraint("json_schema", json.dumps(schema))
    greedy = GenerationParams(temperature=0.0, max_new_tokens=256)
    sampled = GenerationParams(temperature=1.0, max_new_tokens=256)
    answers = await asyncio.gather(
        ask(question, greedy, constraint=constraint),
        *(ask(question, sampled, constraint=constraint, seed=seed) for seed in (1, 2, 3)),
    )
    for answer in answers:
        assert answer.finish_reason == "stop", answer.text
        jsonschema.validate(json.loads(answer.text), schema)


async def test_json_object_answers_are_objects_or_cut_by_the_budget(
    ask, engine: TransformersEngine
) -> None:
    """json_object bounds nothing (a string may go on forever): an answer is a whole object, or
    (finish_reason length) a prefix that the grammar accepted token by token."""
    constraint = OutputConstraint("json_object")
    questions = ["Give me a JSON object about a dog.", "Describe a city as JSON."]
    answers = await asyncio.gather(
        *(ask(q, SAMPLED, constraint=constraint, seed=s) for q in questions for s in range(3)),
        *(
            ask(q, GenerationParams(temperature=0.0, max_new_tokens=96), constraint=constraint)
            for q in questions
        ),
    )
    whole = 0
    for answer in answers:
        if answer.finish_reason == "stop":
            assert isinstance(json.loads(answer.text), dict)
            whole += 1
        else:
            assert answer.finish_reason == "length" and answer.text.startswith("{")
            matcher = engine.scheduler._controls._grammars.matcher(constraint)
            for token in answer.token_ids:
                matcher.advance(token)  # raises if the grammar never allowed it
    assert whole >= 1


async def test_a_budget_that_ends_mid_value_is_length_and_a_prefix(ask) -> None:
    constraint = OutputConstraint("json_schema", json.dumps(ORDER))
    short = GenerationParams(temperature=0.0, max_new_tokens=6)
    cut = await ask("Write an order for a shop.", short, constraint=constraint)
    longer = GenerationParams(temperature=0.0, max_new_tokens=128)
    full = await ask("Write an order for a shop.", longer, constraint=constraint)
    assert (cut.finish_reason, cut.num_tokens) == ("length", 6)
    assert full.text.startswith(cut.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)


async def test_a_schema_the_grammar_cannot_compile_fails_only_that_request(ask) -> None:
    from serve_app.engines.base import EngineError

    bad = OutputConstraint("json_schema", json.dumps({"type": "nonsense"}))
    good, failed = await asyncio.gather(
        ask("Who wrote Hamlet?"), ask("Who wrote Hamlet?", constraint=bad), return_exceptions=True
    )
    assert isinstance(failed, EngineError) and "nonsense" in str(failed)
    assert good.num_tokens > 0 and good.finish_reason is not None


# ------------------------------------------------- `n` choices (serve_app/choices.py), as run
async def answer_choices(
    engine: TransformersEngine,
    formatter: TransformersPromptFormatter,
    question: str,
    n: int,
    params: GenerationParams,
    **fields,
) -> list[AnswerChunk]:
    """A request's `n` choices as the ingress runs them: n generations at once (one batch),
    each with the seed derived for its index."""
    from serve_app.model_contract import merge_chunks
    from serve_app.openai_api.sampling import choice_requests

    prompt = formatter.model_input([ChatMessage("user", question)])

    async def whole(request: GenerationRequest) -> AnswerChunk:
        return merge_chunks([chunk async for chunk in engine.stream(request)])

    requests = choice_requests(GenerationRequest(prompt, params, **fields), n)
    return list(await asyncio.gather(*(whole(r) for r in requests)))


async def test_n_choices_are_reproducible_per_request_and_greedy_ones_equal(
    engine: TransformersEngine, formatter: TransformersPromptFormatter
) -> None:
    question = "Tell me a fun fact about the sea."
    sampled = GenerationParams(temperature=1.0, max_new_tokens=8)  # few steps: a cheap test
    greedy_params = GenerationParams(temperature=0.0, max_new_tokens=8)
    first, greedy = await asyncio.gather(  # one batch of 6 rows
        answer_choices(engine, formatter, question, 3, sampled, seed=11, logprobs=1),
        answer_choices(engine, formatter, question, 3, greedy_params),
    )
    again = await answer_choices(engine, formatter, question, 3, sampled, seed=11, logprobs=1)
    assert [a.text for a in again] == [a.text for a in first]  # seed, seed+1, seed+2
    assert len({a.text for a in first}) > 1  # each choice samples with its own seed
    for answer in first:
        assert len(answer.logprobs) == answer.num_tokens > 0
        assert "".join(lp.token for lp in answer.logprobs) == answer.text
    assert len({a.text for a in greedy}) == 1  # as vLLM: greedy choices are equal
