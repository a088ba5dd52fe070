"""OpenAI's Responses API end to end: the official `openai` SDK against `serve run` on
loopback with the mock engine (echo: it repeats the last user message), API keys on, and the
embedded (Ray actor) store. A response chain is a conversation in the session store: owned by
the key that made it, one active turn at a time, saved by the same bookkeeping.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from serve_app.api_keys import API_KEYS_ENV
from serve_app.config import ADMIN_TOKEN_ENV
from serve_app.local_server import LocalServe
from tests.support import new_request_id, outcome_of, wait_for

ADMIN_TOKEN = "test-admin-token-0123456789"
KEYS = {key_id: f"sk-{key_id}-0123456789" for key_id in ("alice", "bob")}
MODEL = "mock"
SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "echo",
    "mock_time_per_token_sec": 0.02,
    "max_ongoing_requests": 2,
    "max_queued_requests": 2,
    "max_context_tokens": 400,
    "max_new_tokens": 64,
}
SERVICE_ENV = {
    API_KEYS_ENV: "\n".join(f"{key_id}:{key}" for key_id, key in KEYS.items()),
    ADMIN_TOKEN_ENV: ADMIN_TOKEN,
}


@pytest.fixture(scope="module")
def service():
    with LocalServe(SERVICE_ARGS, env=SERVICE_ENV) as server:
        yield server


def sdk(service, key_id: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{service.url}/v1", api_key=KEYS[key_id], timeout=30, max_retries=0
    )


def rid(prefix: str) -> dict:
    return {"X-ChatStream-Request-Id": new_request_id(prefix)}


def outcome(service, headers: dict) -> str:
    return outcome_of(service.url, headers["X-ChatStream-Request-Id"], admin_token=ADMIN_TOKEN)


def test_create_retrieve_follow_up_and_delete(service):
    client = sdk(service)
    headers = rid("resp")
    first = client.responses.create(
        model=MODEL, input="hello there", instructions="Be brief.", extra_headers=headers
    )
    assert first.id.startswith("resp_") and first.object == "response"
    assert first.status == "completed" and first.output_text == "hello there"
    assert first.instructions == "Be brief."
    assert first.usage.output_tokens == 2 and first.usage.input_tokens > 0
    assert first.usage.total_tokens == first.usage.input_tokens + 2
    assert outcome(service, headers) == "success"

    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == "hello there"
    assert again.status == "completed" and again.usage.output_tokens == 2

    follow = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "and more"}]}],
        previous_response_id=first.id,
        temperature=0.5,
        max_output_tokens=32,
    )
    assert follow.output_text == "and more"
    assert follow.previous_response_id == first.id
    # The chain's history went into the prompt.
    assert follow.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(first.id).output_text == "hello there"

    # A chain is one line, not a tree: only its latest response can be continued.
    with pytest.raises(openai.ConflictError) as caught:
        client.responses.create(model=MODEL, input="branch", previous_response_id=first.id)
    assert caught.value.code == "previous_response_not_latest"

    client.responses.delete(follow.id)  # the whole conversation goes
    for gone in (first.id, follow.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="more", previous_response_id=follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(follow.id)


def test_streaming_sends_the_typed_events_and_stores_the_answer(service):
    client = sdk(service)
    headers = rid("resp-sse")
    events = list(
        client.responses.create(model=MODEL, input="one two three", stream=True,
                                extra_headers=headers)
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == "one two three" == done.output_text
    assert done.status == "completed" and done.usage.output_tokens == 3
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert outcome(service, headers) == "success"
    assert client.responses.retrieve(done.id).output_text == "one two three"

    # The SDK's own stream helper reads the same events.
    with client.responses.stream(model=MODEL, input="four", previous_response_id=done.id) as stream:
        final = stream.get_final_response()
    assert final.output_text == "four" and final.previous_response_id == done.id


def test_a_response_belongs_to_the_key_that_made_it(service):
    mine = sdk(service, "alice").responses.create(model=MODEL, input="private")
    other = sdk(service, "bob")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="hijack", previous_response_id=mine.id)
    assert sdk(service, "alice").responses.retrieve(mine.id).output_text == "private"
    anonymous = httpx.get(f"{service.url}/v1/responses/{mine.id}")
    assert anonymous.status_code == 401


def test_store_false_keeps_nothing_and_unknown_ids_are_404(service):
    client = sdk(service)
    loose = client.responses.create(model=MODEL, input="forget me", store=False)
    assert loose.output_text == "forget me"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(loose.id)
    for bad in ("resp_nope", "resp_" + "0" * 64):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(bad)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL, input="x", previous_response_id=bad)


def test_two_follow_ups_at_once_on_one_chain_get_one_409(service):
    client = sdk(service)
    start = client.responses.create(model=MODEL, input="start")
    long_input = " ".join(f"w{i}" for i in range(40))  # ~0.8 s of answer
    results: list[object] = []

    def follow_up() -> None:
        try:
            results.append(
                client.responses.create(
                    model=MODEL, input=long_input, previous_response_id=start.id
                )
            )
        except openai.APIStatusError as exc:
            results.append(exc)

    threads = [threading.Thread(target=follow_up) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    conflicts = [r for r in results if isinstance(r, openai.ConflictError)]
    answers = [r for r in results if not isinstance(r, Exception)]
    assert len(conflicts) == 1 and len(answers) == 1, results
    assert conflicts[0].code == "turn_in_progress"
    assert answers[0].output_text == long_input
    # The winner's answer is the chain's latest: it can be continued.
    assert (
        client.responses.create(
            model=MODEL, input="next", previous_response_id=answers[0].id
        ).output_text
        == "next"
    )


def test_unsupported_tools_and_structured_outputs_are_refused_naming_the_field(service):
    client = sdk(service)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert caught.value.param == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "xml"}})
    assert caught.value.param == "text.format.type"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=MODEL, input=[{"role": "user", "content": [{"type": "input_image"}]}]
        )
    assert caught.value.param == "input[0].content[0].type"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input="x")
    # The neutral values pass.
    assert (
        client.responses.create(
            model=MODEL, input="ok", tools=[], text={"format": {"type": "text"}}
        ).output_text
        == "ok"
    )


def test_a_client_that_leaves_mid_stream_keeps_the_cut_answer_as_incomplete(service):
    client = sdk(service)
    long_input = " ".join(f"v{i}" for i in range(60))  # ~1.2 s of answer
    headers = {**rid("resp-cut"), "Authorization": f"Bearer {KEYS['alice']}"}
    body = {"model": MODEL, "input": long_input, "stream": True}
    seen, response_id = "", None
    with httpx.stream(
        "POST", f"{service.url}/v1/responses", json=body, headers=headers, timeout=30
    ) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
            if event["type"] == "response.output_text.delta":
                seen += event["delta"]
                if len(seen.split()) >= 3:
                    break  # and close the connection
    assert outcome(service, headers) == "client_disconnected_while_streaming"
    cut = wait_for(lambda: _retrieved(client, response_id))
    assert cut.status == "incomplete"
    # What the client got (the server counts a piece once the next is asked for).
    assert long_input.startswith(cut.output_text) and 0 < len(cut.output_text) < len(long_input)
    # The cut answer is the chain's latest: the conversation goes on from it.
    follow = client.responses.create(model=MODEL, input="go on", previous_response_id=cut.id)
    assert follow.output_text == "go on"


def _retrieved(client: openai.OpenAI, response_id: str):
    try:
        return client.responses.retrieve(response_id)
    except openai.NotFoundError:
        return None


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}  # fmt: skip
# echo repeats the user's words: this one makes the "model" call the tool (tool_choice auto)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def test_a_tool_call_is_a_function_call_item_and_its_output_continues_the_chain(service):
    client = sdk(service)
    headers = rid("resp-tool")
    answer = client.responses.create(
        model=MODEL, input=f"Checking. {CALL}", tools=[WEATHER], extra_headers=headers
    )
    assert [item.type for item in answer.output] == ["message", "function_call"]
    assert answer.output_text == "Checking."
    call = answer.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert call.status == "completed" and call.call_id.startswith("call_")
    assert answer.tools[0].name == "get_weather" and answer.tool_choice == "auto"
    assert outcome(service, headers) == "success"
    assert client.responses.retrieve(answer.id).output[1].call_id == call.call_id

    # The client runs the tool and sends its result on the chain.
    follow = client.responses.create(
        model=MODEL,
        previous_response_id=answer.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12C"}],
        tools=[WEATHER],
    )
    # echo repeats the last user turn: the tool's result, as the model read it
    assert follow.output_text == "<tool_response>\n12C\n</tool_response>"
    assert [item.type for item in follow.output] == ["message"]
    # The chain kept the call and its result: the next turn continues from it.
    last = client.responses.create(model=MODEL, previous_response_id=follow.id, input="thanks")
    assert last.output_text == "thanks"


def test_a_streamed_tool_call_sends_the_function_call_events(service):
    client = sdk(service)
    events = list(client.responses.create(model=MODEL, input=CALL, tools=[WEATHER], stream=True))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert [item.type for item in done.output] == ["function_call"]
    assert json.loads(events[4].arguments) == {"city": "Oslo"}
    assert client.responses.retrieve(done.id).output[0].call_id == done.output[0].call_id

    # The SDK's stream helper, and the call echoed back with its output (no chain: store off).
    with client.responses.stream(model=MODEL, input=CALL, tools=[WEATHER], store=False) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    follow = client.responses.create(
        model=MODEL,
        store=False,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name,
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "9C"},
        ],
        tools=[WEATHER],
    )  # fmt: skip
    assert "9C" in follow.output_text


def test_a_forced_call_is_decoded_under_its_schema(service):
    client = sdk(service)
    answer = client.responses.create(
        model=MODEL,
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
    )
    if answer.status == "incomplete":  # the mock's JSON did not fit the budget: text
        pytest.skip("the forced call did not fit max_output_tokens")
    assert [item.type for item in answer.output] == ["function_call"]
    call = answer.output[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        model=MODEL,
        previous_response_id=answer.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "7C"}],
    )
    assert follow.output_text == "<tool_response>\n7C\n</tool_response>"
