"""The mock engine's answers to OpenAI's controls (engines/mock_output.py): lengths, log
probabilities, and JSON decoded under the same grammar matcher as the transformers engine's."""

from __future__ import annotations

import json

import jsonschema
import pytest

from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.engines.base import ChatMessage, EngineError
from serve_app.engines.features import unsupported_features
from serve_app.engines.mock import MockEngine, MockPromptFormatter
from serve_app.engines.mock_output import answer_words, constrained_text
from serve_app.model_contract import AnswerChunk, GenerationRequest, OutputConstraint


async def ask(question: str, max_new_tokens: int = 32, mode: str = "echo", **fields):
    config = ChatStreamConfig(mock_mode=mode)
    prompt = MockPromptFormatter(config).render([ChatMessage("user", question)])
    request = GenerationRequest(prompt, GenerationParams(max_new_tokens=max_new_tokens), **fields)
    assert unsupported_features("mock", request) == []
    return [chunk async for chunk in MockEngine(config).stream(request)]


def text(chunks: list[AnswerChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_answer_words_lengths() -> None:
    words = ["a", " b", " c"]
    assert answer_words(iter(words), 8) == (words, "stop")
    assert answer_words(iter(words), 2) == (["a", " b"], "length")
    assert answer_words(iter(words), 5, ignore_eos=True) == (
        ["a", " b", " c", " a", " b"],
        "length",
    )
    assert answer_words(iter(words), 8, min_tokens=4) == (["a", " b", " c", " a"], "stop")
    assert answer_words(iter(words), 3, min_tokens=6) == (words, "length")
    assert answer_words(iter([]), 4, ignore_eos=True) == ([], "stop")


async def test_ignore_eos_and_min_tokens_set_the_mocks_length() -> None:
    plain = await ask("one two three")
    assert (text(plain), plain[-1].finish_reason) == ("one two three", "stop")
    fixed = await ask("one two three", max_new_tokens=7, ignore_eos=True)
    assert len(fixed) == 7 and fixed[-1].finish_reason == "length"
    assert text(fixed) == "one two three one two three one"
    at_least = await ask("one two three", min_tokens=5)
    assert len(at_least) == 5 and at_least[-1].finish_reason == "stop"


async def test_mock_logprobs_are_certain_and_name_the_token() -> None:
    chunks = await ask("one two", logprobs=3)
    for chunk in chunks:
        (lp,) = chunk.logprobs
        assert (lp.token, lp.logprob) == (chunk.text, 0.0)
        assert [(t.token, t.logprob) for t in lp.top] == [(chunk.text, 0.0)]
    assert all(c.logprobs[0].top == () for c in await ask("one two", logprobs=0))
    assert all(c.logprobs == () for c in await ask("one two"))


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"sky": {"enum": ["sunny", "cloudy"]}, "tags": {"type": "array"}},
        "required": ["sky", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "string", "minLength": 3}, "minItems": 2},
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 10}, "ok": {"type": "boolean"}},
                "required": ["id", "ok"],
            },
        },
        "required": ["items", "owner"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "nested"])
@pytest.mark.parametrize("mode", ["echo", "long"])
async def test_mock_json_schema_answers_validate(schema: dict, mode: str) -> None:
    constraint = OutputConstraint("json_schema", json.dumps(schema))
    chunks = await ask("Tell me about it", max_new_tokens=200, mode=mode, constraint=constraint)
    assert chunks[-1].finish_reason == "stop"
    assert all(c.num_tokens == 1 for c in chunks)
    jsonschema.validate(json.loads(text(chunks)), schema)


async def test_mock_json_object_is_an_object_with_the_mocks_words() -> None:
    chunks = await ask("hello there", constraint=OutputConstraint("json_object"))
    value = json.loads(text(chunks))
    assert isinstance(value, dict) and "hello there" in json.dumps(value)
    assert chunks[-1].finish_reason == "stop"


async def test_mock_json_cut_by_its_budget_is_length() -> None:
    chunks = await ask("hello there", max_new_tokens=5, constraint=OutputConstraint("json_object"))
    assert len(chunks) == 5 and chunks[-1].finish_reason == "length"
    assert text(chunks).startswith("{")


def test_constrained_text_follows_the_grammar_not_the_filler() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    chars, finish = constrained_text(
        OutputConstraint("json_schema", json.dumps(schema)), "words only", 64
    )
    assert finish == "stop" and isinstance(json.loads("".join(chars))["n"], int)


async def test_a_bad_schema_is_an_engine_error() -> None:
    bad = OutputConstraint("json_schema", json.dumps({"type": "nonsense"}))
    with pytest.raises(EngineError, match="nonsense"):
        await ask("hi", constraint=bad)
