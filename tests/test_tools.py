"""Tools for /v1/chat/completions and /v1/responses: parsing, the forced-call constraint,
prompt rendering and tool-call extraction (pure functions)."""

from __future__ import annotations

import json

import pytest

from serve_app.openai_api.tool_calls import (
    ToolCallStream,
    delta_tool_calls,
    extract_tool_calls,
    function_call_item,
    message_tool_calls,
    parse_forced_call,
    render_assistant_calls,
    render_tool_result,
    with_tools_system,
)
from serve_app.openai_api.tools import (
    ToolCall,
    forced_call_constraint,
    parse_message_tool_calls,
    parse_text_format,
    parse_tool_choice,
    parse_tools,
)
from serve_app.refusals import Refusal

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
TIME = {"type": "function", "function": {"name": "get_time"}}


def refused(fn, *args, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn(*args, **kwargs)
    assert info.value.status_code == 400
    return info.value


def test_tools_parse_both_shapes():
    tools = parse_tools([WEATHER, TIME])
    assert [t.name for t in tools] == ["get_weather", "get_time"]
    assert tools[0].parameters["required"] == ["city"]
    assert tools[1].parameters == {"type": "object", "properties": {}}
    flat = parse_tools([{"type": "function", **WEATHER["function"]}], flat=True)
    assert flat == tools[:1]
    assert parse_tools(None) == () == parse_tools([])


@pytest.mark.parametrize(
    "tools, param",
    [
        ({"x": 1}, "tools"),
        ([{"type": "code_interpreter"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "tools[0].function.parameters",
        ),
        ([WEATHER, WEATHER], "tools[1].name"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(tools, param):
    assert refused(parse_tools, tools).param == param


def test_tool_choice():
    tools = parse_tools([WEATHER, TIME])
    assert parse_tool_choice(None, tools).mode == "auto"
    assert parse_tool_choice(None, ()).mode == "none"
    assert parse_tool_choice("required", tools).forced
    named = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools)
    assert (named.mode, named.name) == ("function", "get_time")
    flat = parse_tool_choice({"type": "function", "name": "get_time"}, tools, flat=True)
    assert flat == named
    assert refused(parse_tool_choice, "always", tools).param == "tool_choice"
    assert refused(parse_tool_choice, "required", ()).param == "tool_choice"
    unknown = {"type": "function", "function": {"name": "nope"}}
    assert "not in 'tools'" in refused(parse_tool_choice, unknown, tools).message


def test_forced_call_constraint_names_the_tools_and_their_parameters():
    tools = parse_tools([WEATHER, TIME])
    assert forced_call_constraint(tools, parse_tool_choice("auto", tools)) is None
    named = forced_call_constraint(
        tools, parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    )
    schema = json.loads(named.schema_json)
    assert named.kind == "json_schema"
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"]["required"] == ["city"]
    anyof = json.loads(
        forced_call_constraint(tools, parse_tool_choice("required", tools)).schema_json
    )
    assert [v["properties"]["name"]["const"] for v in anyof["anyOf"]] == ["get_weather", "get_time"]


def test_forced_call_output_is_parsed():
    tools = parse_tools([WEATHER])
    call = parse_forced_call('{"name": "get_weather", "arguments": {"city": "Kyoto"}}', tools)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Kyoto"})
    assert call.id.startswith("call_")
    assert parse_forced_call('{"name": "get_weather", "argu', tools) is None  # cut off


def test_auto_answer_extracts_only_valid_calls():
    tools = parse_tools([WEATHER])
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    text = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    content, calls = extract_tool_calls(text, tools)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    plain = "It is sunny. <tool_call>{not json}</tool_call>"
    assert extract_tool_calls(plain, tools) == (plain, ())
    other = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert extract_tool_calls(other, tools) == (other, ())


def test_streamed_auto_answer_holds_back_only_a_possible_call():
    tools = parse_tools([WEATHER])
    stream = ToolCallStream(tools)
    sent, calls = [], []
    pieces = [
        "Hi <",
        "tool",
        "_call>",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Rome"}}',
        "</tool_",
        "call> bye",
    ]
    for piece in pieces:
        text, new = stream.feed(piece)
        sent.append(text)
        calls.extend(new)
    sent.append(stream.flush())
    assert "".join(sent) == "Hi  bye"
    assert sent[0] == "Hi "  # the "<" waits: it may open a call
    assert [c.name for c in calls] == ["get_weather"] and stream.calls == calls
    plain = ToolCallStream(tools)
    assert plain.feed("a < b")[0] == "a < b"
    assert plain.feed(" <tool_call>oops")[0] == " "
    assert plain.flush() == "<tool_call>oops"


def test_history_renders_as_text_messages():
    calls = parse_message_tool_calls(
        [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
        "messages[1].tool_calls",
    )
    rendered = render_assistant_calls("", calls)
    assert (
        rendered
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert render_tool_result("12C") == {
        "role": "user",
        "content": "<tool_response>\n12C\n</tool_response>",
    }
    bad = [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert refused(parse_message_tool_calls, bad, "m").param == "m[0].function.arguments"


def test_tools_join_the_system_prompt():
    tools = parse_tools([WEATHER])
    messages = with_tools_system(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tools
    )
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in messages[0]["content"] and len(messages) == 2
    assert with_tools_system([{"role": "user", "content": "Hi"}], tools)[0]["role"] == "system"
    assert with_tools_system([{"role": "user", "content": "Hi"}], ()) == [
        {"role": "user", "content": "Hi"}
    ]


def test_encodings():
    call = ToolCall(id="call_abc", name="f", arguments="{}")
    assert message_tool_calls([call]) == [
        {"id": "call_abc", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    assert delta_tool_calls([call], 2)[0]["index"] == 2
    item = function_call_item(call)
    assert (item["type"], item["call_id"], item["id"]) == ("function_call", "call_abc", "fc_abc")


def test_text_format():
    assert parse_text_format(None) is None and parse_text_format({"type": "text"}) is None
    assert parse_text_format({"type": "json_object"}).kind == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    c = parse_text_format({"type": "json_schema", "name": "out", "schema": schema})
    assert (c.kind, json.loads(c.schema_json)) == ("json_schema", schema)
    assert refused(parse_text_format, {"type": "xml"}).param == "text.format.type"
    assert (
        refused(parse_text_format, {"type": "json_schema", "name": "out"}).param
        == "text.format.schema"
    )


# ------------------------------------------------------------ the /v1/chat/completions hooks
def chat(**body):
    from serve_app.openai_api.protocol import parse_chat_completion

    return parse_chat_completion({"model": "m", **body}, served_model="m")


def test_chat_request_with_tools_and_history():
    request = chat(
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
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
        ],
        tools=[WEATHER],
    )
    assert request.tool_choice.mode == "auto" and request.tools[0].name == "get_weather"
    assert [m["role"] for m in request.messages] == ["user", "assistant", "user"]
    assert request.messages[1]["content"].startswith("<tool_call>")
    assert request.messages[2]["content"] == "<tool_response>\n12C\n</tool_response>"


def test_whole_answers_with_tools():
    from serve_app.openai_api.tool_answers import answer_with_calls, finish_reason

    auto = chat(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert answer_with_calls(auto, "Hello!") == ("Hello!", [])
    content, calls = answer_with_calls(
        auto, '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    assert content == "" and calls[0]["function"]["name"] == "get_weather"
    assert (
        finish_reason("stop", calls) == "tool_calls" and finish_reason("length", calls) == "length"
    )
    forced = chat(
        messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="required"
    )
    _, calls = answer_with_calls(forced, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    none = chat(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="none")
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert answer_with_calls(none, text) == (text, [])


def events(sse: str) -> list:
    return [json.loads(e[6:]) for e in sse.split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_streamed_answers_with_tools(choice):
    from serve_app.openai_api.encoding import StreamEncoder
    from serve_app.openai_api.tool_answers import ToolStreamEncoder

    request = chat(
        messages=[{"role": "user", "content": "hi"}],
        tools=[WEATHER],
        tool_choice=choice,
        stream=True,
    )
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    pieces = ["<tool", "_call>", call, "</tool_call>"] if choice == "auto" else [call[:9], call[9:]]
    encoder = ToolStreamEncoder(request, StreamEncoder(request))
    counts = {"prompt_tokens": 3, "completion_tokens": 4}
    sse = "".join(encoder.feed(p, **counts) for p in pieces)
    sse += encoder.end(finish_reason="stop", **counts)
    chunks = events(sse)
    calls = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not any(ch["choices"][0]["delta"].get("content") for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert sse.endswith("data: [DONE]\n\n")


def test_forced_calls_are_refused_for_an_engine_without_json_schema(monkeypatch):
    from serve_app.engines import features
    from serve_app.openai_api.tool_answers import tool_constraint

    monkeypatch.setitem(features.ENGINE_FEATURES, "mock", frozenset())
    forced = chat(
        messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="required"
    )
    error = refused(tool_constraint, forced, "mock")
    assert error.param == "tool_choice" and "mock" in error.message
    monkeypatch.setitem(features.ENGINE_FEATURES, "mock", frozenset({"json_schema"}))
    assert tool_constraint(forced, "mock").kind == "json_schema"
    auto = chat(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert tool_constraint(auto, "mock") is None


def test_a_forced_call_on_an_engine_without_json_schema_is_a_400_naming_tool_choice():
    """One feature check for every field (sampling.check_engine), with `tool_choice` named."""
    from serve_app.openai_api.tool_answers import tool_constraint
    from serve_app.refusals import Refusal

    forced = chat(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                  tool_choice="required")  # fmt: skip
    assert tool_constraint(forced, "mock").kind == "json_schema"
    with pytest.raises(Refusal) as refused:
        tool_constraint(forced, "bare")  # an engine that honours no feature
    assert (refused.value.param, refused.value.code) == ("tool_choice", "unsupported_parameter")
    assert "bare engine" in refused.value.message
