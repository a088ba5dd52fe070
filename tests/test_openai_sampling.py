"""serve_app.openai_api's sampling fields, unknown fields and log probabilities, as pure
functions: a body -> `Sampling` -> `GenerationRequest` fields; the engine check's 400; the
`TokenLogprob`s -> OpenAI's JSON, judged by the `openai` SDK's own types. No Ray, no server."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_app.config import GenerationParams
from serve_app.engines import features
from serve_app.model_contract import GenerationRequest, OutputConstraint, TokenLogprob, TopLogprob
from serve_app.openai_api import ignored as ignored_module
from serve_app.openai_api.encoding import ChunkBuilder, StreamEncoder, chat_completion
from serve_app.openai_api.ignored import IGNORED_FIELDS_HEADER, header_value, where
from serve_app.openai_api.logprobs import FLOOR, chat_logprobs, completion_logprobs
from serve_app.openai_api.protocol import ChatCompletionRequest, parse_chat_completion
from serve_app.openai_api.sampling import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    Sampling,
    check_engine,
    choice_seed,
)
from serve_app.refusals import Refusal

MODEL = "m"
USER = [{"role": "user", "content": "hi"}]


def parse(body: dict) -> ChatCompletionRequest:
    return parse_chat_completion(
        json.dumps({"model": MODEL, "messages": USER, **body}), served_model=MODEL
    )


def refused(body: dict) -> Refusal:
    with pytest.raises(Refusal) as info:
        parse(body)
    assert info.value.status_code == 400
    return info.value


def generation(sampling: Sampling, **kwargs) -> GenerationRequest:
    return GenerationRequest("p", GenerationParams(), **sampling.generation_fields(), **kwargs)


# ------------------------------------------------------------------------- sampling fields
def test_defaults_ask_for_nothing():
    sampling = parse({}).sampling
    assert sampling == Sampling()
    assert features.features_needed(generation(sampling)) == []
    neutral = parse({"n": 1, "logprobs": False, "presence_penalty": 0, "logit_bias": {},
                     "response_format": {"type": "text"}, "ignore_eos": False})  # fmt: skip
    assert neutral.sampling == Sampling()


def test_every_field_maps_onto_the_contract():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = parse(
        {
            "n": 3, "seed": 5, "ignore_eos": True, "min_tokens": 4, "max_completion_tokens": 8,
            "presence_penalty": -2, "frequency_penalty": 1.5,
            "logit_bias": {"42": -100, "7": 3.5, "9": 0}, "logprobs": True, "top_logprobs": 20,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "Answer", "schema": schema, "strict": True},
            },
        }
    )  # fmt: skip
    sampling = request.sampling
    assert sampling.n == 3 and request.seed == 5
    made = generation(sampling, seed=choice_seed(request.seed, 2))
    assert (made.ignore_eos, made.min_tokens, made.seed) == (True, 4, 7)
    assert (made.presence_penalty, made.frequency_penalty) == (-2.0, 1.5)
    assert made.logit_bias == ((7, 3.5), (42, -100.0))  # sorted, the zero bias dropped
    assert made.logprobs == 20
    assert made.constraint.kind == "json_schema"
    assert json.loads(made.constraint.schema_json) == schema
    assert features.features_needed(made) == [
        "ignore_eos", "min_tokens", "penalties", "logit_bias", "logprobs", "json_schema",
    ]  # fmt: skip


def test_logprobs_and_response_format_variants():
    assert parse({"logprobs": True}).sampling.logprobs == 0
    assert parse({"response_format": {"type": "json_object"}}).sampling.constraint == (
        OutputConstraint("json_object")
    )
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert parse({"response_format": no_schema}).sampling.constraint.kind == "json_object"


def test_max_completion_tokens_is_the_budget_and_max_tokens_its_alias():
    assert parse({"max_completion_tokens": 9}).params == {"max_new_tokens": 9}
    assert parse({"max_tokens": 9}).params == {"max_new_tokens": 9}
    assert refused({"max_tokens": 9, "max_completion_tokens": 8}).param == "max_tokens"


def test_seeds_of_choices_differ_and_wrap():
    assert [choice_seed(10, i) for i in range(3)] == [10, 11, 12]
    assert choice_seed(None, 1) is None
    assert choice_seed(2**63 - 1, 1) == -(2**63)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": MAX_CHOICES + 1}, "n"),
        ({"n": True}, "n"),
        ({"n": "2"}, "n"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": [1]}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "strict": "yes"}}},
         "response_format.json_schema.strict"),
    ],
)  # fmt: skip
def test_invalid_sampling_values_name_the_field(body, param):
    assert refused(body).param == param


@pytest.mark.parametrize(
    ("body", "param", "feature"),
    [
        ({"ignore_eos": True}, "ignore_eos", "ignore_eos"),
        ({"min_tokens": 2}, "min_tokens", "min_tokens"),
        ({"presence_penalty": 0.5}, "presence_penalty", "penalties"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "penalties"),
        ({"logit_bias": {"5": 1}}, "logit_bias", "logit_bias"),
        ({"logprobs": True}, "logprobs", "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format", "json_object"),
    ],
)
def test_the_engine_check_names_the_engine_and_the_field(body, param, feature, monkeypatch):
    request = generation(parse(body).sampling)
    monkeypatch.setitem(features.ENGINE_FEATURES, "mock", frozenset())
    with pytest.raises(Refusal) as info:
        check_engine("mock", request)
    error = info.value
    assert (error.status_code, error.code, error.param) == (400, "unsupported_parameter", param)
    assert "mock engine" in error.message and feature in error.message
    monkeypatch.setitem(features.ENGINE_FEATURES, "mock", frozenset({feature}))
    check_engine("mock", request)  # honoured: no refusal


# --------------------------------------------------------------------------- unknown fields
def test_unknown_fields_everywhere_are_ignored_with_their_paths():
    messages = [
        {"role": "system", "content": "s", "cache_control": {"type": "ephemeral"}},
        {"role": "user", "content": [
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
        ]},
    ]  # fmt: skip
    request = parse({"messages": messages, "mirostat": 2, "a.b": 1, "stream": True,
                     "stream_options": {"include_usage": True, "zz": 1}})  # fmt: skip
    assert request.messages[1] == {"role": "user", "content": "a"}
    assert request.ignored == (
        "mirostat", "a.b", "messages[0].cache_control", "messages[1].content[0].cache_control",
        "stream_options.zz",
    )  # fmt: skip
    assert [where(n) for n in request.ignored] == [
        "top_level", "top_level", "message", "content_part", "stream_options",
    ]  # fmt: skip


def test_image_parts_stay_refused():
    part = {"type": "image_url", "image_url": {"url": "data:,"}}
    error = refused({"messages": [{"role": "user", "content": [part]}]})
    assert error.param == "messages[0].content[0].type"


def test_the_header_is_bounded_and_safe():
    assert IGNORED_FIELDS_HEADER == "x-chatstream-ignored-fields"
    assert header_value(["a", "messages[0].content[1].cache_control"]) == (
        "a,messages[0].content[1].cache_control"
    )
    value = header_value(["é\r\nx: y", "b c"])
    assert value == "%C3%A9%0D%0Ax%3A%20y,b%20c" and value.isascii()
    many = header_value([f"field{i}" for i in range(100)])
    assert many.endswith(",...") and many.count(",") == 32
    assert len(header_value(["x" * 5000] * 40)) <= 2048 + 4


# ------------------------------------------------------------------------- log probabilities
LOGPROBS = (
    TokenLogprob(1, "Hé", -0.25, (TopLogprob(1, "Hé", -0.25), TopLogprob(2, "Ho", -1.5))),
    TokenLogprob(3, "!", float("-inf"), (TopLogprob(3, "!", float("-inf")),)),
)


def test_chat_logprobs_in_openais_format():
    encoded = chat_logprobs(LOGPROBS)
    first, second = encoded["content"]
    assert first == {
        "token": "Hé", "logprob": -0.25, "bytes": [72, 195, 169],
        "top_logprobs": [{"token": "Hé", "logprob": -0.25, "bytes": [72, 195, 169]},
                         {"token": "Ho", "logprob": -1.5, "bytes": [72, 111]}],
    }  # fmt: skip
    assert second["logprob"] == FLOOR and second["top_logprobs"][0]["logprob"] == FLOOR
    json.dumps(encoded, allow_nan=False)  # no -Infinity on the wire

    whole = ChatCompletion.model_validate(
        chat_completion(
            model=MODEL,
            content="Hé!",
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=2,
            logprobs=LOGPROBS,
        )  # fmt: skip
    )
    content = whole.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hé", "!"]
    assert content[0].top_logprobs[1].bytes == [72, 111]
    plain = chat_completion(model=MODEL, content="x", finish_reason="stop", prompt_tokens=1,
                            completion_tokens=1)  # fmt: skip
    assert plain["choices"][0]["logprobs"] is None


def test_streamed_chunks_carry_their_tokens_logprobs():
    encoder = StreamEncoder(parse({"stream": True, "logprobs": True, "top_logprobs": 2}),
                            ChunkBuilder(MODEL))  # fmt: skip
    first = encoder.feed("Hé", logprobs=LOGPROBS[:1])
    held = encoder.feed("", logprobs=LOGPROBS[1:])  # text held back, its token still counted
    chunks = [ChatCompletionChunk.model_validate_json(e[len("data: ") :]) for e in (first, held)]
    assert chunks[0].choices[0].logprobs.content[0].token == "Hé"
    assert chunks[1].choices[0].delta.content == ""
    assert chunks[1].choices[0].logprobs.content[0].token == "!"
    plain = StreamEncoder(parse({"stream": True}), ChunkBuilder(MODEL))
    assert json.loads(plain.feed("x")[len("data: ") :])["choices"][0]["logprobs"] is None
    assert plain.feed("") == ""


def test_legacy_completion_logprobs():
    encoded = completion_logprobs(LOGPROBS, text_offset=3)
    assert encoded == {
        "tokens": ["Hé", "!"], "token_logprobs": [-0.25, FLOOR],
        "top_logprobs": [{"Hé": -0.25, "Ho": -1.5}, {"!": FLOOR}], "text_offset": [3, 5],
    }  # fmt: skip


# ---------------------------------------------------------------- what the SDK really sends
def test_the_sdks_parse_with_a_pydantic_model_maps_to_a_json_schema_constraint():
    """`client.chat.completions.parse(response_format=Model)` sends OpenAI's strict
    `json_schema`: captured from the SDK itself, it parses into the constraint (and the mock
    engine's 400 names it until the engine honours it)."""
    import httpx2
    import openai
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    bodies: list[bytes] = []

    def server(request: httpx2.Request) -> httpx2.Response:
        bodies.append(request.content)
        chat = parse_chat_completion(request.content, served_model=MODEL)
        try:
            check_engine("mock", generation(chat.sampling))
        except Refusal as error:
            return httpx2.Response(400, json=error.openai_body())
        content = json.dumps({"name": "Paris", "population": 2})
        return httpx2.Response(200, json=chat_completion(
            model=MODEL, content=content, finish_reason="stop", prompt_tokens=1,
            completion_tokens=1))  # fmt: skip

    client = openai.OpenAI(
        base_url="http://chatstream.test/v1", api_key="unused", max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(server)),
    )  # fmt: skip
    if "json_schema" in features.ENGINE_FEATURES["mock"]:
        parsed = client.chat.completions.parse(model=MODEL, messages=USER, response_format=City)
        assert parsed.choices[0].message.parsed == City(name="Paris", population=2)
    else:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.parse(model=MODEL, messages=USER, response_format=City)
        assert info.value.param == "response_format" and "mock engine" in info.value.message
    constraint = parse_chat_completion(bodies[-1], served_model=MODEL).sampling.constraint
    assert constraint.kind == "json_schema"
    schema = json.loads(constraint.schema_json)
    assert schema["properties"].keys() == {"name", "population"}
    assert schema["additionalProperties"] is False  # the SDK's strict form


def test_report_counts_by_where_and_returns_the_header(monkeypatch):
    counted: list[dict] = []

    class Recorder:
        def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
            counted.append(tags)

    stand_in = SimpleNamespace(get=Recorder)  # the metric, without a Ray cluster
    monkeypatch.setattr(ignored_module.metrics, "IGNORED_FIELDS", stand_in)
    names = ["mirostat", "messages[0].content[0].cache_control"]
    assert ignored_module.report(names, "completions") == {
        IGNORED_FIELDS_HEADER: "mirostat,messages[0].content[0].cache_control"
    }
    assert counted == [
        {"route": "completions", "where": "top_level"},
        {"route": "completions", "where": "content_part"},
    ]
    assert ignored_module.report([], "completions") == {} and len(counted) == 2
