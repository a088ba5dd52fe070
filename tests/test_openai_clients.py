"""The clients people build with, unchanged, against `serve run` with the mock engine (only
the protocol matters here): the openai SDK (`chat.completions.parse` with a pydantic model,
`completions.create`), LangChain's `ChatOpenAI` (`invoke`, `stream`, `with_structured_output`)
and LiteLLM's `openai/` provider (completion and stream). All pinned in the test extra.

Structured outputs need the engine's `json_schema` feature (engines/features.py): until the
mock honours it, these tests check the client sees the 400 naming the engine; once it does,
they check the answer parses (they switch by themselves on merge)."""

from __future__ import annotations

import os

import openai
import pytest
from pydantic import BaseModel

from serve_app.engines.features import ENGINE_FEATURES
from serve_app.local_server import LocalServe
from tests.support import wait_for

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import

MODEL = "mock"
STRUCTURED = "json_schema" in ENGINE_FEATURES["mock"]


class Pet(BaseModel):
    name: str
    legs: int


@pytest.fixture(scope="module")
def service():
    with LocalServe({"engine": "mock", "mock_mode": "round", "max_new_tokens": 8}) as server:
        yield server


@pytest.fixture
def sdk(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat_model(service, **kwargs):
    from langchain_openai import ChatOpenAI

    kwargs.setdefault("max_tokens", 3)
    return ChatOpenAI(model=MODEL, base_url=f"{service.url}/v1", api_key="unused",
                      max_retries=0, timeout=30, **kwargs)  # fmt: skip


USER = [{"role": "user", "content": "red green blue"}]


def test_openai_sdk_completions(sdk):
    whole = sdk.completions.create(model=MODEL, prompt="red green blue", max_tokens=3)
    assert whole.choices[0].text == "red green blue" and whole.usage.completion_tokens == 3
    stream = sdk.completions.create(model=MODEL, prompt="red green", max_tokens=2, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "red green"


def test_openai_sdk_parse_with_a_pydantic_model(sdk):
    if STRUCTURED:
        parsed = sdk.chat.completions.parse(
            model=MODEL, messages=USER, response_format=Pet, max_tokens=96
        )
        assert isinstance(parsed.choices[0].message.parsed, Pet)
        return
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.parse(model=MODEL, messages=USER, response_format=Pet)
    assert info.value.param == "response_format" and "mock engine" in info.value.message


def test_langchain_invoke_and_stream(service):
    model = chat_model(service)
    assert model.invoke("red green blue").content == "red green blue"
    pieces = [chunk.content for chunk in model.stream("red green blue")]
    assert "".join(pieces) == "red green blue" and len(pieces) > 1
    answer = chat_model(service, stream_usage=True).invoke("red green")
    assert answer.content == "red green red"  # the mock's round mode fills the budget
    assert answer.usage_metadata["output_tokens"] == 3  # the stream's usage chunk
    assert answer.usage_metadata["input_tokens"] > 0


def test_langchain_with_structured_output(service):
    structured = chat_model(service, max_tokens=64).with_structured_output(Pet)  # json_schema
    if STRUCTURED:
        assert isinstance(structured.invoke("a pet, as JSON"), Pet)
        return
    with pytest.raises(openai.BadRequestError) as info:
        structured.invoke("a pet, as JSON")
    assert "mock engine" in info.value.message


def test_litellm_completion_and_stream(service):
    import litellm

    options = {"model": f"openai/{MODEL}", "api_base": f"{service.url}/v1", "api_key": "unused",
               "messages": USER, "max_tokens": 3}  # fmt: skip
    answer = litellm.completion(**options)
    assert answer.choices[0].message.content == "red green blue"
    assert answer.usage.completion_tokens == 3
    chunks = litellm.completion(**options, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "red green blue"


def test_openai_sdk_n_choices_chat_and_completions_one_request_each(sdk, service):
    """`n=3` (serve_app/choices.py): three choices by index, whole and streamed, chat and
    completions; `usage` counts the prompt once and all three answers; each call is one
    admitted request (one outcome), and every slot is free afterwards."""
    import httpx

    def totals() -> dict:
        return httpx.get(f"{service.url}/outcomes").json()

    single = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    before = wait_for(lambda: (t := totals())["open"] == 0 and t)
    whole = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, n=3, seed=1)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert {(c.message.content, c.finish_reason) for c in whole.choices} == {
        ("red green blue", "length")
    }
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens
    assert whole.usage.completion_tokens == 9

    options = {"stream": True, "stream_options": {"include_usage": True}}
    stream = sdk.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, n=3, **options)
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts == dict.fromkeys(range(3), "red green")
    assert reasons == dict.fromkeys(range(3), "length") and usage.completion_tokens == 6

    text = sdk.completions.create(model=MODEL, prompt="red green", max_tokens=2, n=2, echo=True)
    assert [(c.index, c.text) for c in text.choices] == [(0, "red greenred green"),
                                                         (1, "red greenred green")]  # fmt: skip
    assert text.usage.completion_tokens == 4
    streamed: dict[int, str] = {}
    for chunk in sdk.completions.create(model=MODEL, prompt="red", max_tokens=2, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: "red red", 1: "red red"}

    after = wait_for(lambda: (t := totals())["open"] == 0 and t)
    assert after["admitted"] == before["admitted"] + 4
    assert after["outcomes"]["success"] == before["outcomes"]["success"] + 4
    load = httpx.get(f"{service.url}/load").json()
    assert load["fair_queue"]["in_flight"] == 0


def test_n_above_max_choices_is_a_400_naming_n(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=USER, n=9)  # over MAX_CHOICES (8)
    assert info.value.param == "n"
