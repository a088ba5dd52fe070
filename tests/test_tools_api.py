"""Tools end to end: the official `openai` SDK and LangChain against `serve run` on loopback.

With the mock engine in `echo` mode the answer is the user's own words, so a user message that
holds a Hermes `<tool_call>` block makes the "model" call a tool: this drives `tool_choice:
auto` through the whole request path (whole and streamed). Forced calls (`required`, a named
function) need an engine that decodes under a JSON schema: they are refused with a 400 naming
the engine until ENGINE_FEATURES says it can, and tested for real once it does.
"""

from __future__ import annotations

import json

import openai
import pytest

from serve_app.engines.features import ENGINE_FEATURES
from serve_app.local_server import LocalServe

MODEL = "mock"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
MOCK_HAS_SCHEMA = "json_schema" in ENGINE_FEATURES["mock"]


@pytest.fixture(scope="module")
def service():
    args = {"engine": "mock", "mock_mode": "echo", "max_new_tokens": 256}
    with LocalServe({**args, "max_context_tokens": 4096}) as server:
        yield server


def sdk(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=30)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_auto_tool_call_whole(service):
    answer = sdk(service).chat.completions.create(model=MODEL, messages=user(CALL), tools=[WEATHER])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert not choice.message.content


def test_auto_tool_call_streamed(service):
    stream = sdk(service).chat.completions.create(
        model=MODEL, messages=user(f"Checking. {CALL}"), tools=[WEATHER], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert text.strip() == "Checking."
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_without_a_call_answers_text_and_the_follow_up_renders(service):
    # Open WebUI sends tools with every chat: a plain answer must stay a plain answer.
    answer = sdk(service).chat.completions.create(
        model=MODEL, messages=user("just text <b>"), tools=[WEATHER]
    )
    assert answer.choices[0].message.content == "just text <b>"
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == "stop"
    history = [
        *user("Weather in Oslo?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
    ]
    follow_up = sdk(service).chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    # echo repeats the last user turn: the tool's result, as the model read it
    assert "12C" in follow_up.choices[0].message.content


@pytest.mark.skipif(MOCK_HAS_SCHEMA, reason="the mock engine decodes under a JSON schema now")
def test_forced_calls_are_refused_naming_the_engine(service):
    with pytest.raises(openai.BadRequestError) as info:
        sdk(service).chat.completions.create(
            model=MODEL, messages=user("hi"), tools=[WEATHER], tool_choice="required"
        )
    assert info.value.body["param"] == "tool_choice" and "mock" in info.value.body["message"]


def test_langchain_bind_tools_auto(service):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{service.url}/v1", api_key="unused", max_retries=0
    )
    message = llm.bind_tools([WEATHER], tool_choice="auto").invoke(CALL)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
