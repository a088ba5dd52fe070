"""serve_app.openai_api (parsing, response objects, SSE) and serve_app.refusals (errors).

The `openai` SDK is the judge: its request bodies are captured and parsed, and our responses
are served to it through an in-process transport (with `_strict_response_validation`), so
what it parses and raises is what a real client would. No Ray, no server.
"""

from __future__ import annotations

import json
import time

import httpx2
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_app.config import GenerationParams
from serve_app.engines.stop_strings import StopMatcher
from serve_app.model_contract import GenerationRequest
from serve_app.openai_api.encoding import (
    SSE_DONE,
    ChunkBuilder,
    StreamEncoder,
    chat_completion,
    model_list,
    sse_event,
)
from serve_app.openai_api.protocol import ChatCompletionRequest, parse_chat_completion
from serve_app.openai_api.sampling import check_engine
from serve_app.openai_api.service import check_choices
from serve_app.refusals import (
    Refusal,
    authentication_error,
    rate_limited,
    retry_after_headers,
    server_error,
    service_unavailable,
)

MODEL = "smollm2-135m"


def parse(body: dict, **kwargs) -> ChatCompletionRequest:
    return parse_chat_completion(
        json.dumps({"model": MODEL, **body}).encode(), served_model=MODEL, **kwargs
    )


def refused(body: dict, **kwargs) -> Refusal:
    with pytest.raises(Refusal) as info:
        parse(body, **kwargs)
    return info.value


USER = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------------- parsing
def test_minimal_request_has_no_overrides():
    request = parse({"messages": USER})
    assert request.messages == [{"role": "user", "content": "hi"}]
    assert request.params == {} and request.stop == ()
    assert not request.stream and not request.include_usage
    assert request.generation_params({"temperature": 0.7}) == {"temperature": 0.7}


def test_content_parts_roles_and_parameters():
    request = parse(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": None, "refusal": None},
                {"role": "user", "content": "again"},
            ],
            "temperature": 0,
            "top_p": 0.5,
            "top_k": -1,
            "max_completion_tokens": 12,
            "stop": "\n\n",
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
            "user": "alice",
            "metadata": {"team": "x"},
            "n": 1,
            "logprobs": False,
            "presence_penalty": 0.0,
            "tools": [],
            "response_format": {"type": "text"},
        }
    )
    assert request.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
    ]
    assert request.params == {"temperature": 0.0, "top_p": 0.5, "top_k": 0, "max_new_tokens": 12}
    GenerationParams(**request.generation_params(GenerationParams().model_dump()))
    assert request.stop == ("\n\n",)
    assert request.stream and request.include_usage and request.user == "alice"


def test_max_tokens_aliases():
    assert parse({"messages": USER, "max_tokens": 7}).params == {"max_new_tokens": 7}
    assert parse({"messages": USER, "max_tokens": 7, "max_completion_tokens": 7}).params == {
        "max_new_tokens": 7
    }
    assert refused({"messages": USER, "max_tokens": 7, "max_completion_tokens": 8}).param == (
        "max_tokens"
    )


def test_include_usage_only_when_streaming():
    request = parse({"messages": USER, "stream_options": {"include_usage": True}})
    assert not request.stream and not request.include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 5000}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10.5}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"user": 5}, "user"),
    ],
)
def test_invalid_values_name_the_parameter(body, param):
    error = refused({"messages": USER, **body})
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)  # fmt: skip
def test_known_fields_that_would_change_the_answer_are_refused_by_name(body, param):
    error = refused({"messages": USER, **body})
    assert (error.status_code, error.code, error.param) == (400, "unsupported_parameter", param)
    assert param in error.message


def test_unknown_fields_are_ignored_and_listed():
    request = parse({"messages": USER, "mirostat": 2, "stream_options": {"x": 1}})
    assert request.ignored == ("mirostat", "stream_options.x")
    assert parse({"messages": USER, "add_generation_prompt": True}).ignored == ()


def test_seed_is_passed_on_and_checked():
    assert parse({"messages": USER, "seed": 42}).seed == 42
    assert refused({"messages": USER, "seed": 2**64}).param == "seed"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": {}, "content": "x"}], "messages[0].role"),  # unhashable: was a 500
        ([{"role": ["user"], "content": "x"}], "messages[0].role"),
        ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                        {"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[1].type"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
         "messages[0].tool_calls[0].function"),
        ([{"role": "tool", "content": "x", "name": "f"}], "messages[0].name"),
    ],
)  # fmt: skip
def test_bad_messages_name_the_place(messages, param):
    assert refused({"messages": messages}).param == param


def test_model_and_json_errors():
    error = refused({"model": "gpt-4o", "messages": USER})
    assert (error.status_code, error.code, error.param) == (404, "model_not_found", "model")
    with pytest.raises(Refusal) as info:
        parse_chat_completion(b'{"messages": []', served_model=MODEL)
    assert (info.value.status_code, info.value.code) == (400, "invalid_json")
    with pytest.raises(Refusal) as info:  # NaN is not JSON
        parse_chat_completion(
            b'{"model": "%s", "messages": [], "temperature": NaN}' % MODEL.encode(),
            served_model=MODEL,
        )
    assert info.value.code == "invalid_json"
    with pytest.raises(Refusal) as info:  # 10,000 deep: a 400, not a RecursionError
        parse_chat_completion(
            b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", served_model=MODEL
        )
    assert (info.value.status_code, info.value.code) == (400, "invalid_json")
    nested = {"model": MODEL, "messages": USER, "metadata": {}}
    inner = nested["metadata"]
    for _ in range(40):  # beyond the app's JSON depth bound, far below Python's
        inner["x"] = inner = {}
    with pytest.raises(Refusal) as info:
        parse_chat_completion(json.dumps(nested), served_model=MODEL)
    assert (info.value.status_code, info.value.code) == (400, "invalid_json")
    with pytest.raises(Refusal) as info:
        parse_chat_completion({"messages": USER}, served_model=MODEL)  # a parsed dict works too
    assert info.value.param == "model"


def test_error_objects_and_headers():
    assert authentication_error().openai_body() == {
        "error": {
            "message": "a valid API key is required",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert retry_after_headers(0.2) == {"Retry-After": "1", "retry-after-ms": "200"}
    assert retry_after_headers(41.0001)["Retry-After"] == "42"
    limited = rate_limited("slow down", 2.5, "tokens_per_minute_exceeded")
    assert (limited.status_code, limited.reason) == (429, "tokens_per_minute_exceeded")
    assert limited.response().headers["retry-after"] == "3"
    assert service_unavailable().status_code == 503
    assert server_error().openai_body()["error"]["code"] == "unknown_error_occurred"
    assert json.loads(server_error().sse()[len("data: ") :]) == server_error().openai_body()


def test_one_refusal_renders_in_either_shape():
    """One refusal type: ChatStream's JSON on its own routes, OpenAI's object on /v1, with the
    same status and Retry-After headers."""
    busy = Refusal(429, "too_many_requests", "busy", retry_after_s=2)
    assert busy.type == "rate_limit_error" and busy.headers["retry-after-ms"] == "2000"
    plain, openai_shaped = busy.response(), busy.response(openai=True)
    assert json.loads(plain.body) == {"error": "too_many_requests", "message": "busy"}
    assert json.loads(openai_shaped.body)["error"]["code"] == "too_many_requests"
    assert plain.headers["retry-after"] == openai_shaped.headers["retry-after"] == "2"
    store = service_unavailable()
    assert (store.status_code, store.type, store.headers["Retry-After"]) == (
        503, "service_unavailable_error", "2",
    )  # fmt: skip
    too_long = Refusal(413, "prompt_too_long", "too long", param="messages")
    assert (too_long.type, too_long.openai_body()["error"]["param"]) == (
        "invalid_request_error", "messages",
    )  # fmt: skip


# ---------------------------------------------------------------------------------- objects
def test_objects_validate_as_the_sdk_types():
    builder = ChunkBuilder(MODEL, include_usage=True)
    for chunk in (builder.delta("Hel", first=True), builder.delta("lo"), builder.finish("stop")):
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert parsed.id == builder.id and parsed.usage is None
    assert ChatCompletionChunk.model_validate(builder.delta(first=True)).choices[0].delta.role == (
        "assistant"
    )
    usage_chunk = ChatCompletionChunk.model_validate(builder.usage(5, 2))
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == 7
    assert "usage" not in ChunkBuilder(MODEL).delta("x")

    completion = ChatCompletion.model_validate(
        chat_completion(
            model=MODEL,
            content="Hello",
            finish_reason="length",
            prompt_tokens=3,
            completion_tokens=4,
        )  # fmt: skip
    )
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
    }  # fmt: skip
    assert Model.model_validate(model_list(MODEL)["data"][0]).id == MODEL
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'


# ---------------------------------------------------------------------------------- SSE
def sse_objects(text: str) -> list:
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def test_stream_encoder_events():
    request = parse({"messages": USER, "stream": True, "stream_options": {"include_usage": True}})
    encoder = StreamEncoder(request)
    first = encoder.feed("STill here")
    chunk = ChatCompletionChunk.model_validate_json(sse_objects(first)[0])
    assert (chunk.choices[0].delta.role, chunk.choices[0].delta.content) == (
        "assistant",
        "STill here",
    )
    second = ChatCompletionChunk.model_validate_json(sse_objects(encoder.feed(" and "))[0])
    assert (second.choices[0].delta.role, second.choices[0].delta.content) == (None, " and ")
    assert encoder.feed("") == ""  # nothing to send is no chunk
    rest = sse_objects(encoder.end(prompt_tokens=3, completion_tokens=6, finish_reason="stop"))
    assert rest[-1] == "[DONE]"
    finish, usage_chunk = (ChatCompletionChunk.model_validate_json(o) for o in rest[:-1])
    assert finish.choices[0].finish_reason == "stop"  # the engine's reason, as given
    assert usage_chunk.usage.total_tokens == 9


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk():
    options = {"include_usage": True, "continuous_usage_stats": True}
    request = parse({"messages": USER, "stream": True, "stream_options": options})
    assert request.continuous_usage
    encoder = StreamEncoder(request)
    chunks = [
        sse_objects(encoder.feed(word, prompt_tokens=5, completion_tokens=n))[0]
        for n, word in enumerate(("one", " two", " three"), start=1)
    ]
    rest = sse_objects(encoder.end(prompt_tokens=5, completion_tokens=3, finish_reason="stop"))
    parsed = [ChatCompletionChunk.model_validate_json(o) for o in [*chunks, *rest[:-1]]]
    assert [c.usage.completion_tokens for c in parsed] == [1, 2, 3, 3, 3]
    assert {c.usage.prompt_tokens for c in parsed} == {5}
    assert parsed[-2].choices[0].finish_reason == "stop" and parsed[-1].choices == []
    # Without include_usage it asks for nothing; without the option, chunks carry usage null.
    alone = {"messages": USER, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert not parse(alone).continuous_usage
    assert parse({"messages": USER, "ignore_eos": False}).params == {}


def test_stream_encoder_empty_answer_still_sends_the_role():
    encoder = StreamEncoder(parse({"messages": USER, "stream": True, "stop": "x"}))
    end = encoder.end(prompt_tokens=1, completion_tokens=0, finish_reason="stop")
    assert end.endswith(SSE_DONE)
    objects = sse_objects(end)
    first, finish = (ChatCompletionChunk.model_validate_json(o) for o in objects[:-1])
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert finish.choices[0].finish_reason == "stop" and finish.usage is None
    assert objects[-1] == "[DONE]"


# ---------------------------------------------------------------------------------- the SDK
class FakeServer:
    """A stand-in for the route, built only from this module: echoes the last user message,
    one word per token, honouring max tokens and stop strings."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.pending_errors: list[Refusal] = []
        self.fail_mid_stream = False

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/v1/models":
            return httpx2.Response(200, json=model_list(MODEL))
        self.bodies.append(json.loads(request.content))
        try:
            if self.pending_errors:
                raise self.pending_errors.pop(0)
            chat = parse_chat_completion(request.content, served_model=MODEL)
            # The service's checks before admission, as it makes them (the mock's features).
            check_choices(chat.sampling.n, slots=1)  # a one-slot server
            check_engine(
                "mock",
                GenerationRequest("", GenerationParams(), **chat.sampling.generation_fields()),
            )
        except Refusal as error:
            return httpx2.Response(
                error.status_code, json=error.openai_body(), headers=error.headers
            )
        params = chat.generation_params(GenerationParams().model_dump())
        words = chat.messages[-1]["content"].split(" ")
        tokens = [w + " " for w in words[:-1]] + words[-1:]
        tokens = tokens[: params["max_new_tokens"]]
        if chat.stream:
            return self.stream(chat, tokens, len(words), params["max_new_tokens"])
        text, generated, reason = self.generate(chat, tokens, params["max_new_tokens"])
        body = chat_completion(
            model=MODEL, content=text, finish_reason=reason, prompt_tokens=len(words),
            completion_tokens=generated,
        )  # fmt: skip
        return httpx2.Response(200, json=body)

    @staticmethod
    def generate(chat, tokens, max_new_tokens) -> tuple[str, int, str]:
        """What the model side does: stop strings cut the text, the reason is decided."""
        matcher = StopMatcher(chat.stop)
        sent, generated = [], 0
        for token in tokens:
            generated += 1
            sent.append(matcher.feed(token))
            if matcher.stopped:
                break
        sent.append(matcher.flush())
        reason = "length" if not matcher.stopped and generated >= max_new_tokens else "stop"
        return "".join(sent), generated, reason

    def stream(self, chat, tokens, prompt_tokens, max_new_tokens) -> httpx2.Response:
        encoder = StreamEncoder(chat)
        text, generated, reason = self.generate(chat, tokens, max_new_tokens)
        pieces = text.split(" ")
        events = [encoder.feed(p + " " if i < len(pieces) - 1 else p)
                  for i, p in enumerate(pieces)]  # fmt: skip
        if self.fail_mid_stream:
            events.append(server_error().sse())
        events.append(
            encoder.end(
                prompt_tokens=prompt_tokens, completion_tokens=generated, finish_reason=reason
            )
        )
        return httpx2.Response(
            200, content="".join(events).encode(), headers={"content-type": "text/event-stream"}
        )


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def client(server: FakeServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://chatstream.test/v1",
        api_key="unused",
        http_client=httpx2.Client(transport=httpx2.MockTransport(server)),
        _strict_response_validation=True,
        **kwargs,
    )


def async_client(server: FakeServer, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://chatstream.test/v1",
        api_key="unused",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(server)),
        _strict_response_validation=True,
        **kwargs,
    )


SAY = [{"role": "user", "content": "one two three four five"}]


def test_sdk_non_streaming(server):
    completion = client(server).chat.completions.create(model=MODEL, messages=SAY)
    assert completion.choices[0].message.content == "one two three four five"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 5)

    completion = client(server).chat.completions.create(model=MODEL, messages=SAY, max_tokens=2)
    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 2


def test_sdk_streaming_with_usage_and_stop(server):
    stream = client(server).chat.completions.create(
        model=MODEL, messages=SAY, stream=True, stream_options={"include_usage": True},
        stop=["ee fo"],
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two thr"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_sdk_async_streaming(server):
    stream = await async_client(server).chat.completions.create(
        model=MODEL, messages=SAY, stream=True, max_completion_tokens=3
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three "
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_sdk_sends_what_we_parse(server):
    """Every parameter we accept, as the SDK serialises it."""
    client(server).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        temperature=0.2, top_p=0.9, max_tokens=5, stop="x", user="u", n=1, metadata={"a": "b"},
        extra_body={"top_k": 10},
    )  # fmt: skip
    request = parse_chat_completion(server.bodies[-1], served_model=MODEL)
    assert request.params == {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 5, "top_k": 10}
    # An assistant message as the SDK returns it, sent back as history.
    previous = (
        ChatCompletion.model_validate(
            chat_completion(
                model=MODEL,
                content="hello",
                finish_reason="stop",
                prompt_tokens=1,
                completion_tokens=1,
            )  # fmt: skip
        )
        .choices[0]
        .message
    )
    history = [*SAY, previous.model_dump(), {"role": "user", "content": "more"}]
    client(server).chat.completions.create(model=MODEL, messages=history)
    assert parse_chat_completion(server.bodies[-1], served_model=MODEL).messages[1] == {
        "role": "assistant", "content": "hello",
    }  # fmt: skip


def test_sdk_raises_the_right_errors(server):
    sdk = client(server, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=SAY, n=2)  # more than its slots
    assert (info.value.param, info.value.code) == ("n", "invalid_value")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=SAY, presence_penalty=0.5)
    assert (info.value.param, info.value.code) == ("presence_penalty", "unsupported_parameter")
    assert "mock engine" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL, messages=SAY, tools=[{"type": "function", "function": {"name": "a b"}}]
        )
    assert info.value.param == "tools[0].function.name"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-4o", messages=SAY)
    assert info.value.code == "model_not_found"
    server.pending_errors.append(authentication_error())
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model=MODEL, messages=SAY)
    server.pending_errors.append(rate_limited("over quota", 3.0, "tokens_per_minute_exceeded"))
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(model=MODEL, messages=SAY)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "tokens_per_minute_exceeded"
    server.pending_errors.append(service_unavailable())
    with pytest.raises(openai.InternalServerError) as info:
        sdk.chat.completions.create(model=MODEL, messages=SAY)
    assert info.value.status_code == 503
    server.pending_errors.append(server_error())
    with pytest.raises(openai.InternalServerError) as info:
        sdk.chat.completions.create(model=MODEL, messages=SAY)
    assert info.value.code == "unknown_error_occurred"


def test_sdk_retries_a_429_after_retry_after(server):
    server.pending_errors.append(rate_limited("busy", 0.3, "too_many_requests"))
    started = time.monotonic()
    completion = client(server, max_retries=1).chat.completions.create(model=MODEL, messages=SAY)
    assert completion.choices[0].finish_reason == "stop"
    assert len(server.bodies) == 2
    assert 0.3 <= time.monotonic() - started < 2.0  # waited retry-after-ms, not a backoff guess


def test_sdk_sees_a_mid_stream_error(server):
    server.fail_mid_stream = True
    stream = client(server).chat.completions.create(model=MODEL, messages=SAY, stream=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        list(stream)


def test_sdk_lists_the_model(server):
    models = client(server).models.list()
    assert [m.id for m in models] == [MODEL]
    assert models.data[0].owned_by == "chatstream"
