"""The issue's "done when", tried as a new user would: `serve run` with the defaults (the
embedded SmolLM2-135M-Instruct on the transformers engine), then the official `openai` SDK
streams an answer from it."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serve_app.engines.features import ENGINE_FEATURES
from serve_app.local_server import LocalServe
from serve_app.openai_api.service import EMBEDDED_MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def service():
    with LocalServe({"max_new_tokens": 24}, startup_timeout_s=300) as server:
        yield server


def test_the_sdk_streams_a_smollm2_answer(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [EMBEDDED_MODEL_NAME]
    stream = client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    totals = httpx.get(f"{service.url}/outcomes").json()  # loopback: no admin token needed
    assert totals["outcomes"]["success"] == 1


def test_completions_text_and_token_ids_give_the_same_greedy_answer(service):
    """`/v1/completions` on the real engine: a text prompt and its token ids (checked against
    the vocabulary, `echo` decoding them) are the same prompt to the model."""
    from serve_app.config import ChatStreamConfig
    from serve_app.engines.chat_tokens import prompt_token_ids
    from serve_app.engines.hf_loading import load_tokenizer

    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    text = "The capital of France is"
    ids = prompt_token_ids(load_tokenizer(ChatStreamConfig()), text)
    options = {"model": EMBEDDED_MODEL_NAME, "max_tokens": 6, "temperature": 0}
    by_text = client.completions.create(prompt=text, **options)
    by_ids = client.completions.create(prompt=ids, echo=True, **options)
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.choices[0].text and by_ids.choices[0].text.endswith(by_text.choices[0].text)
    assert "France" in by_ids.choices[0].text  # the echoed prompt, decoded
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(prompt=[10**6], **options)
    assert info.value.param == "prompt"


def test_a_chat_with_tools_answers_text_when_the_model_calls_none(service):
    # Open WebUI sends tools with every chat (tool_choice absent = auto): the answer stays text.
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    answer = client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=tools,
        max_tokens=16,
        temperature=0,
    )
    message = answer.choices[0].message
    assert message.tool_calls is None and message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 60  # the tools were offered in the system prompt


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            # Bounded, so that the constrained answer completes within the budget: an unbounded
            # string may run until max_tokens, and a cut call is no call (engines/grammar.py).
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    },
}
needs_schema = pytest.mark.skipif(
    "json_schema" not in ENGINE_FEATURES["transformers"],
    reason="the transformers engine does not decode under a JSON schema yet",
)


@needs_schema
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_match_their_schema(service, stream, choice):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    ask = dict(
        model=EMBEDDED_MODEL_NAME,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice=choice,
        max_tokens=64,
        temperature=0,
    )
    if stream:
        chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = client.chat.completions.create(**ask)
        calls, finish = answer.choices[0].message.tool_calls, answer.choices[0].finish_reason
    (call,) = calls
    assert call.function.name == "get_weather" and finish == "tool_calls"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


@needs_schema
def test_langchain_bind_tools_with_a_forced_choice(service):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=EMBEDDED_MODEL_NAME, base_url=f"{service.url}/v1", api_key="unused", max_tokens=96
    )
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


@needs_schema
def test_a_responses_forced_call_and_its_output_continue_the_chain(service):
    """/v1/responses with tools on the real model: a forced call is one `function_call` item
    (streamed as its events), and its output continues the stored chain."""
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    flat = {"type": "function", **WEATHER["function"]}
    ask = dict(model=EMBEDDED_MODEL_NAME, tools=[flat], max_output_tokens=64, temperature=0)
    with client.responses.stream(
        input="What is the weather in Paris?", tool_choice="required", **ask
    ) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21C, sunny"}],
        **ask,
    )  # tool_choice auto: the model may answer text or call again
    assert follow.status in ("completed", "incomplete") and follow.output
    # the same tools offered, with the chain's call and its output after the question
    assert follow.usage.input_tokens > first.usage.input_tokens
