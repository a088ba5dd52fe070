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
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


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
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "f g"}]}, "tools[0].name"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        (
            {
                "input": "x",
                "tools": [WEATHER],
                "tool_choice": "required",
                "text": {"format": {"type": "json_object"}},
            },
            "tool_choice",
        ),  # fmt: skip
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),  # fmt: skip
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "1", "x": 1}]},
            "input[0].x",
        ),  # fmt: skip
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
            "text.format.schema",
        ),
        ({"input": [{"role": "user", "content": [{"type": {}}]}]}, "input[0].content[0].type"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [7]}]},
            "input[0].output[0]",
        ),  # fmt: skip
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


def test_tools_and_tool_choice_are_read_in_the_flat_shape():
    ask = parse(input="x", tools=[WEATHER])
    assert [t.name for t in ask.tools] == ["get_weather"] and ask.tool_choice.mode == "auto"
    assert ask.constraint is None
    ask = parse(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    assert ask.tool_choice.name == "get_weather"
    schema = json.loads(ask.constraint.schema_json)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert parse(input="x", tools=[WEATHER], tool_choice="none").constraint is None


def test_function_call_items_are_rendered_as_the_model_wrote_and_read_them():
    ask = parse(
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Oslo"}', "id": "fc_1", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather",
             "arguments": '{"city": "Bergen"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "12C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "9C"}]},
        ]
    )  # fmt: skip
    assert [m["role"] for m in ask.messages] == ["user", "assistant", "user"]
    calls = ask.messages[1]["content"]
    assert calls.count("<tool_call>") == 2 and '"city": "Bergen"' in calls
    assert ask.messages[2]["content"] == (
        "<tool_response>\n12C\n</tool_response>\n<tool_response>\n9C\n</tool_response>"
    )


def _tool_facts(**kw):
    from serve_app.openai_api.tools import parse_tool_choice, parse_tools

    tools = parse_tools([WEATHER], flat=True)
    choice = parse_tool_choice(kw.pop("tool_choice", None), tools, flat=True)
    return ResponseFacts(
        id="resp_" + "d" * 64, created_at=1.0, model=MODEL, tools=tools, tool_choice=choice
    )


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def test_an_auto_call_is_a_function_call_item_and_retrieval_shows_the_same_ids():
    from openai.types.responses import Response

    facts = _tool_facts()
    meta = {**facts.as_meta(), "outcome": "success", "prompt_tokens": 3,
            "completion_tokens": 2, "finish_reason": "stop"}  # fmt: skip
    meta = json.loads(json.dumps(meta))  # as the store keeps it
    body = stored_response(facts.id, {"content": f"Checking. {CALL}", "meta": meta})
    answer = Response.model_validate(body)
    assert [item.type for item in answer.output] == ["message", "function_call"]
    call = answer.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert call.call_id.startswith("call_") and call.id == "fc_" + call.call_id[5:]
    again = stored_response(facts.id, {"content": f"Checking. {CALL}", "meta": meta})
    assert again["output"][1]["call_id"] == call.call_id
    assert answer.tools[0].name == "get_weather" and answer.tool_choice == "auto"
    # Not a known tool: text.
    body = stored_response(facts.id, {"content": CALL.replace("get_weather", "x"), "meta": meta})
    assert [item["type"] for item in body["output"]] == ["message"]


def _stream(facts, pieces, finish_reason="stop"):
    from types import SimpleNamespace

    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from serve_app.model_contract import AnswerChunk
    from serve_app.responses.encoding import ResponseEvents

    encoder = ResponseEvents(facts)
    exchange = SimpleNamespace(finish_reason=finish_reason, prompt_tokens=3, completion_tokens=2)
    wire = "".join(encoder.chunk(exchange, AnswerChunk(text=p, num_tokens=1)) for p in pieces)
    wire += encoder.end(exchange)
    blocks = [b for b in wire.split("\n\n") if b and not b.startswith(":")]
    events = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_streamed_auto_call_is_its_items_events():
    from openai.types.responses import Response

    facts = _tool_facts()
    pieces = ["Checking. ", *[CALL[i : i + 7] for i in range(0, len(CALL), 7)], "\n"]
    events = _stream(facts, pieces)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, delta, done = events[8], events[9], events[11]
    assert added["output_index"] == 1 and added["item"]["status"] == "in_progress"
    assert (
        json.loads(delta["delta"]) == {"city": "Oslo"} and delta["item_id"] == added["item"]["id"]
    )
    final = Response.model_validate(events[-1]["response"])
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == done["item"]["call_id"]
    # The same answer, whole, has the same items and ids (its text is stripped of the blanks
    # the call left; a stream has sent them already).
    whole = stored_response(
        facts.id,
        {"content": "".join(pieces), "meta": {**facts.as_meta(), "outcome": "success",
         "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "stop"}},
    )  # fmt: skip
    streamed = events[-1]["response"]["output"]
    assert whole["output"][1] == streamed[1]
    assert whole["output"][0]["content"][0]["text"] == streamed[0]["content"][0]["text"].strip()


def test_a_streamed_forced_call_is_one_function_call_item():
    facts = _tool_facts(tool_choice="required")
    events = _stream(facts, ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    kinds = [e["type"] for e in events]
    assert "response.output_text.delta" not in kinds
    assert events[-1]["response"]["output"][0]["type"] == "function_call"
    # Cut off by the token budget, it is text.
    events = _stream(facts, ['{"name": "get_'], finish_reason="length")
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == '{"name": "get_'


def test_a_stored_forced_call_reads_as_a_tool_call_block_in_the_next_prompt():
    from serve_app.responses.tool_items import as_the_model_reads

    meta = _tool_facts(tool_choice="required").as_meta()
    raw = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    shown = as_the_model_reads({"role": "assistant", "content": raw, "meta": meta})
    assert shown["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    cut = {"role": "assistant", "content": '{"name": "get_', "meta": meta}
    assert as_the_model_reads(cut) == cut
    plain = {"role": "assistant", "content": raw, "meta": _tool_facts().as_meta()}
    assert as_the_model_reads(plain) == plain
