"""The Responses API's pure parts: parsing, the chain's owner in the session record, the
response object and the stored answer."""

from __future__ import annotations

import json

import pytest

from serve_app.refusals import Refusal
from serve_app.responses.encoding import ResponseFacts, stored_response
from serve_app.responses.protocol import (
    parse_response_request,
    response_id,
    split_response_id,
)
from serve_app.session_state import (
    NotOwner,
    SessionLimits,
    TurnInProgress,
    apply_change,
    begin_turn,
    finish_turn,
)

MODEL = "mock"


def parse(**body):
    return parse_response_request({"model": MODEL, **body}, served_model=MODEL)


def test_input_as_text_or_messages_and_the_sampling_fields():
    ask = parse(input="hi", instructions="brief", max_output_tokens=5, temperature=0.5, seed=3)
    assert ask.messages == [{"role": "user", "content": "hi"}]
    assert ask.params == {"max_new_tokens": 5, "temperature": 0.5}
    assert ask.seed == 3 and ask.store and not ask.stream and ask.instructions == "brief"
    ask = parse(
        input=[
            {"role": "developer", "content": "be kind"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        ],
        store=False,
    )  # fmt: skip
    assert ask.messages == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "a\nb"},
    ]
    assert not ask.store


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
            "text.format.schema",
        ),
        ({"input": [{"type": "function_call_output", "output": "1"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": {}}]}]}, "input[0].content[0].type"),
        ({"input": []}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "store": "yes"}, "store"),
        ({"input": "x", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_refusals_name_the_field(body, param):
    with pytest.raises(Refusal) as caught:
        parse(**body)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_a_response_id_names_its_chain_and_answer():
    chain, answer = "a" * 32, "b" * 32
    assert split_response_id(response_id(chain, answer)) == (chain, answer)
    assert split_response_id("resp_short") is None


def test_a_chain_belongs_to_the_key_that_began_it_and_saves_every_input_message():
    limits = SessionLimits()
    record = apply_change(None, begin_turn("t1", 0.0, 60, owner="alice"), limits)
    assert record["owner"] == "alice"
    with pytest.raises(NotOwner):
        apply_change(record, begin_turn("t2", 0.0, 60, owner="bob"), limits)
    with pytest.raises(TurnInProgress):
        apply_change(record, begin_turn("t2", 0.0, 60, owner="alice"), limits)
    inputs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    answer = {"role": "assistant", "content": "a", "message_id": "m"}
    record = apply_change(
        record, finish_turn("t1", record["epoch"], user_message=inputs, answer=answer), limits
    )
    assert record["messages"] == [*inputs, answer] and record["turn"] is None


def test_a_stored_cut_answer_is_incomplete():
    facts = ResponseFacts(id="resp_x", created_at=1.0, model=MODEL, params={"top_p": 0.5})
    meta = {**facts.as_meta(), "outcome": "client_disconnected_while_streaming",
            "prompt_tokens": 7, "completion_tokens": 2, "finish_reason": None}  # fmt: skip
    body = stored_response("resp_x", {"content": "par", "meta": meta})
    assert body["status"] == "incomplete" and body["top_p"] == 0.5
    assert body["output"][0]["content"][0]["text"] == "par"
    assert body["usage"]["total_tokens"] == 9


def test_the_object_and_every_event_validate_as_the_sdk_types():
    import json
    from types import SimpleNamespace

    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    from serve_app.model_contract import AnswerChunk
    from serve_app.responses.encoding import ResponseEvents

    facts = ResponseFacts(id="resp_" + "c" * 64, created_at=1.0, model=MODEL)
    meta = {**facts.as_meta(), "outcome": "success", "prompt_tokens": 3,
            "completion_tokens": 2, "finish_reason": "stop"}  # fmt: skip
    Response.model_validate(stored_response(facts.id, {"content": "ok", "meta": meta}))
    encoder = ResponseEvents(facts)
    exchange = SimpleNamespace(finish_reason="length", prompt_tokens=3, completion_tokens=2)
    chunk = AnswerChunk(text="o", num_tokens=1)
    wire = encoder.chunk(exchange, chunk) + encoder.chunk(exchange, chunk) + encoder.end(exchange)
    events = [json.loads(block.split("data: ", 1)[1]) for block in wire.split("\n\n") if block]
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_text_format_becomes_the_constraint():
    ask = parse(input="x", text={"format": {"type": "json_object"}})
    assert ask.constraint.kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    ask = parse(input="x", text={"format": {"type": "json_schema", "name": "s", "schema": schema}})
    assert (ask.constraint.kind, json.loads(ask.constraint.schema_json)) == ("json_schema", schema)
    assert parse(input="x", text={"format": {"type": "text"}}).constraint is None
