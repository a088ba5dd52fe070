"""The issue's "done when", tried as a new user would: `serve run` with the defaults (the
embedded SmolLM2-135M-Instruct on the transformers engine), then the official `openai` SDK
streams an answer from it."""

from __future__ import annotations

import httpx
import openai
import pytest

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
