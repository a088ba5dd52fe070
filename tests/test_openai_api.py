"""The OpenAI-compatible API end to end: the official `openai` SDK (sync and async) against
`serve run` on loopback with the mock engine, API keys on, and an admin token.

One service for the module (one generation slot, one queue place, 10 ms per mock token). Each
test uses API keys of its own, so the per-key token budgets never meet across tests. A second,
plain service (no keys, no admin token) checks what a local `serve run` does by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.api_keys import API_KEYS_ENV
from serve_app.config import ADMIN_TOKEN_ENV
from serve_app.engines.features import ENGINE_FEATURES
from serve_app.local_server import LocalServe
from serve_app.openai_api.ignored import IGNORED_FIELDS_HEADER
from serve_app.validation import REQUEST_ID_HEADER
from tests.support import admin_headers, new_request_id, outcome_of, wait_for

ADMIN_TOKEN = "test-admin-token-0123456789"
KEY_IDS = "models sync stream async bad rate hold1 hold2 retry quit early budget other sum fail"
KEY_IDS += " solo solo2 seed fields completions"
KEYS = {key_id: f"sk-{key_id}-0123456789" for key_id in KEY_IDS.split()}
TOKEN_BUDGET = 150  # tokens per minute per key
MODEL = "mock"
FAIL_MARKER = "PLEASE-FAIL"
PROMETHEUS_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "round",  # repeats the user's words up to max_new_tokens
    "mock_time_per_token_sec": 0.01,
    "mock_fail_marker": FAIL_MARKER,  # the mock engine fails after one token
    "max_ongoing_requests": 1,
    "max_queued_requests": 1,
    "max_context_tokens": 200,
    "max_new_tokens": 8,
    "retry_after_sec": 1,
    "api_key_tokens_per_minute": TOKEN_BUDGET,
    "api_key_max_concurrent_streams": 1,  # each test's keys stream one at a time
}
SERVICE_ENV = {
    API_KEYS_ENV: "\n".join(f"{key_id}:{key}" for key_id, key in KEYS.items()),
    ADMIN_TOKEN_ENV: ADMIN_TOKEN,
}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def service():
    with LocalServe(SERVICE_ARGS, env=SERVICE_ENV) as server:
        yield server


def sdk(service, key_id: str | None, **options) -> openai.OpenAI:
    options.setdefault("max_retries", 0)
    api_key = KEYS[key_id] if key_id else "sk-not-a-key-0123456789"
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key, timeout=30, **options)


def async_sdk(service, key_id: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{service.url}/v1", api_key=KEYS[key_id], timeout=30, max_retries=0
    )


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load(service) -> dict:
    return httpx.get(f"{service.url}/load", headers=ADMIN).json()


def idle(service) -> bool:
    figures = load(service)
    return figures["ongoing"] == 0 and figures["queued"] == 0


def totals(service) -> dict:
    return httpx.get(f"{service.url}/outcomes", headers=ADMIN).json()


def key_usage(url: str, key_id: str, requests: int, headers: dict | None = None) -> dict:
    """A key's figures in /v1/usage once `requests` of its requests are counted there (the
    count follows the outcome, in the request's bookkeeping)."""

    def counted() -> dict | None:
        keys = httpx.get(f"{url}/v1/usage", headers=headers or {}).json()["keys"]
        figures = keys.get(key_id)
        return figures if figures and sum(figures["requests"].values()) >= requests else None

    return wait_for(counted, timeout_s=10)


def outcome(service, request_id: str | dict) -> str:
    if isinstance(request_id, dict):
        request_id = request_id["X-ChatStream-Request-Id"]
    return outcome_of(service.url, request_id, admin_token=ADMIN_TOKEN)


def rid(prefix: str) -> dict:
    return {"X-ChatStream-Request-Id": new_request_id(prefix)}


class Holder(threading.Thread):
    """Holds the generation slot (or the queue place) with a long streamed answer."""

    def __init__(self, service, key_id: str, max_tokens: int = 120) -> None:
        super().__init__(daemon=True)
        self.client = sdk(service, key_id)
        self.max_tokens = max_tokens
        self.text = ""

    def run(self) -> None:
        stream = self.client.chat.completions.create(
            model=MODEL, messages=user("busy"), max_tokens=self.max_tokens, stream=True
        )
        self.text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


# --------------------------------------------------------------------------- answers
def test_models_lists_the_served_name_and_an_unknown_model_is_404(service):
    client = sdk(service, "models")
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert caught.value.code == "model_not_found"


def test_sync_non_streaming_content_finish_reason_usage_and_max_tokens(service):
    client = sdk(service, "sync")
    answer = client.chat.completions.create(model=MODEL, messages=user("one two"), max_tokens=5)
    assert answer.object == "chat.completion" and answer.model == MODEL
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "one two one two one"  # max_tokens=5 mock tokens
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5

    cut = client.chat.completions.create(
        model=MODEL, messages=user("alpha beta gamma"), max_tokens=7, stop=["gamma", "zzz"]
    )
    assert cut.choices[0].message.content == "alpha beta "
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == 2


def test_sync_streaming_chunks_finish_reason_stop_and_usage(service):
    client = sdk(service, "stream")
    headers = rid("sse")
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "red green"}]},
            ],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    )
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(text_chunks) > 2  # streamed, not one blob
    text = "".join(c.choices[0].delta.content for c in text_chunks)
    assert text == "red green red green red green"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert outcome(service, headers) == "success"

    stopped = client.chat.completions.create(
        model=MODEL, messages=user("a b c"), max_tokens=8, stop="c a", stream=True
    )
    parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stopped]
    assert "".join(p for p, _ in parts) == "a b "
    assert parts[-1][1] == "stop"


def test_seed_is_honoured_not_refused(service):
    """`seed` was documented as honoured where the engine supports it, but the route never
    said so: every request with a seed got 400. The same seed gives the same answer."""
    client = sdk(service, "seed")
    answers = {
        client.chat.completions.create(
            model=MODEL, messages=user("seeded words"), max_tokens=4, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert answers == {"seeded words seeded words"}


def test_async_sdk_streaming_and_not(service):
    async def run() -> tuple[str, str]:
        async with async_sdk(service, "async") as client:
            whole = await client.chat.completions.create(
                model=MODEL, messages=user("async hello"), max_tokens=4
            )
            stream = await client.chat.completions.create(
                model=MODEL, messages=user("async hello"), max_tokens=4, stream=True
            )
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed == "async hello async hello"


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"extra_body": {"repetition_penalty": 1.3}}, "repetition_penalty", None),
        ({"n": 2}, "n", "invalid_value"),  # more choices than the one slot runs at once
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
        ({"temperature": 7}, "temperature", "invalid_value"),
        ({"messages": user("word " * 300)}, "messages", "context_length_exceeded"),
        ({"max_tokens": 190, "messages": user("x " * 20)}, "max_tokens", None),
    ],
)
def test_bad_requests_are_400_naming_the_field_and_take_no_slot(service, extra, param, code):
    before = totals(service)["admitted"]
    body = {"model": MODEL, "messages": user("hi"), **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(service, "bad").chat.completions.create(**body)
    error = caught.value.body
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert totals(service)["admitted"] == before


def test_unknown_fields_are_ignored_listed_in_a_header_and_counted(service):
    """Open WebUI's `cache_control` on a content part, and unknown top-level fields: answered,
    and the response says what was ignored."""
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "tagged words", "cache_control": {"type": "ephemeral"}},
    ]}]  # fmt: skip
    raw = sdk(service, "fields").chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"mirostat": 2}
    )
    assert raw.headers[IGNORED_FIELDS_HEADER] == "mirostat,messages[0].content[0].cache_control"
    assert raw.parse().choices[0].message.content == "tagged words"
    plain = sdk(service, "fields").chat.completions.with_raw_response.create(
        model=MODEL, messages=user("x"), max_tokens=1
    )
    assert IGNORED_FIELDS_HEADER not in plain.headers


FEATURE_BODIES = {
    "ignore_eos": ({"extra_body": {"ignore_eos": True}}, "ignore_eos"),
    "min_tokens": ({"extra_body": {"min_tokens": 2}}, "min_tokens"),
    "penalties": ({"presence_penalty": 0.5}, "presence_penalty"),
    "logit_bias": ({"logit_bias": {"5": 1}}, "logit_bias"),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    "json_object": ({"response_format": {"type": "json_object"}}, "response_format"),
}


@pytest.mark.parametrize("feature", sorted(FEATURE_BODIES))
def test_a_feature_the_engine_lacks_is_a_400_naming_the_engine(service, feature):
    if feature in ENGINE_FEATURES["mock"]:
        pytest.skip(f"the mock engine honours {feature}")
    extra, param = FEATURE_BODIES[feature]
    before = totals(service)["admitted"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(service, "fields").chat.completions.create(
            model=MODEL, messages=user("hi"), max_tokens=2, **extra
        )
    error = caught.value.body
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")
    assert "mock engine" in error["message"]
    assert totals(service)["admitted"] == before


@pytest.mark.skipif("logprobs" not in ENGINE_FEATURES["mock"], reason="mock lacks logprobs")
def test_logprobs_whole_and_streamed(service):
    client = sdk(service, "fields")
    whole = client.chat.completions.create(
        model=MODEL, messages=user("a b"), max_tokens=2, logprobs=True, top_logprobs=2
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=user("a b"), max_tokens=2, logprobs=True, stream=True
    )
    tokens = [c.token for chunk in stream if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]  # fmt: skip
    assert len(tokens) == 2


def test_completions_text_stream_echo_usage_and_the_same_accounting(service):
    client = sdk(service, "completions")
    before = totals(service)["admitted"]
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="tick tock", max_tokens=3, extra_body={"cache_control": {}}
    )
    assert raw.headers[IGNORED_FIELDS_HEADER] == "cache_control"
    whole = raw.parse()
    assert whole.object == "text_completion" and whole.choices[0].text == "tick tock tick"
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (2, 3)
    assert outcome(service, raw.headers[REQUEST_ID_HEADER]) == "success"
    echoed = client.completions.create(model=MODEL, prompt="tick", max_tokens=1, echo=True)
    assert echoed.choices[0].text == "ticktick"
    chunks = list(client.completions.create(
        model=MODEL, prompt="tick tock", max_tokens=2, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tick tock"
    assert chunks[-1].usage.completion_tokens == 2
    assert wait_for(lambda: totals(service)["admitted"] == before + 3 or None, timeout_s=30)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": [1, 2]}, "prompt"),  # the mock has no tokenizer
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "word " * 300}, "prompt"),
    ],
)
def test_completions_refusals_name_the_field_and_take_no_slot(service, extra, param):
    before = totals(service)["admitted"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(service, "completions").completions.create(model=MODEL, max_tokens=2, **extra)
    assert caught.value.body["param"] == param
    assert totals(service)["admitted"] == before


def test_a_missing_or_wrong_api_key_is_401_on_v1_and_chat_stream(service):
    with pytest.raises(openai.AuthenticationError):
        sdk(service, None).chat.completions.create(model=MODEL, messages=user("hi"))
    with pytest.raises(openai.AuthenticationError):
        sdk(service, None).models.list()
    response = httpx.post(f"{service.url}/chat_stream", json={"user_input": "hi"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_api_key"
    keyed = httpx.post(
        f"{service.url}/chat_stream",
        json={"user_input": "hi", "max_new_tokens": 2},
        headers={"Authorization": f"Bearer {KEYS['sync']}"},
    )
    assert keyed.status_code == 200 and keyed.text == "hi hi"


def test_queue_full_is_429_and_the_sdk_retry_succeeds_after_retry_after(service):
    wait_for(lambda: idle(service))
    holders = [Holder(service, "hold1"), Holder(service, "hold2")]
    holders[0].start()
    wait_for(lambda: load(service)["ongoing"] == 1)
    holders[1].start()
    wait_for(lambda: load(service)["queued"] == 1)

    with pytest.raises(openai.RateLimitError) as caught:
        sdk(service, "rate").chat.completions.create(model=MODEL, messages=user("hi"))
    assert caught.value.code == "too_many_requests"
    assert caught.value.response.headers["Retry-After"] == "1"

    headers = rid("retry")
    started = time.monotonic()
    answer = sdk(service, "retry", max_retries=6).chat.completions.create(
        model=MODEL, messages=user("again"), max_tokens=2, extra_headers=headers
    )
    assert answer.choices[0].message.content == "again again"
    assert time.monotonic() - started >= 0.9  # it waited for Retry-After at least once
    request_id = headers["X-ChatStream-Request-Id"]
    ledger = httpx.get(
        f"{service.url}/outcomes/ledger", params={"request_id": request_id}, headers=ADMIN
    ).json()
    assert ledger["rejections"] == {request_id: "too_many_requests"}
    assert outcome(service, request_id) == "success"
    for holder in holders:
        holder.join(30)
    assert all(h.text.startswith("busy busy") for h in holders)


# --------------------------------------------------------------------------- disconnects
def test_closing_the_sdk_stream_mid_way_is_recorded_once_and_frees_the_slot(service):
    wait_for(lambda: idle(service))
    before = totals(service)["outcomes"]["client_disconnected_while_streaming"]
    headers = rid("quit")
    stream = sdk(service, "quit").chat.completions.create(
        model=MODEL, messages=user("leaving soon"), max_tokens=150, stream=True,
        extra_headers=headers,
    )  # fmt: skip
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    stream.close()
    request_id = headers["X-ChatStream-Request-Id"]
    assert outcome(service, request_id) == "client_disconnected_while_streaming"
    wait_for(lambda: idle(service), timeout_s=5)  # slot freed at once, not after 1.5 s
    time.sleep(0.5)  # nothing else is recorded later
    after = totals(service)["outcomes"]["client_disconnected_while_streaming"]
    assert after == before + 1
    usage = key_usage(service.url, "quit", 1, ADMIN)
    assert usage["requests"] == {"client_disconnected_while_streaming": 1}
    assert usage["now"]["running_streams"] == 0


def test_leaving_before_the_first_chunk_is_recorded_before_streaming(service):
    wait_for(lambda: idle(service))
    holder = Holder(service, "hold1", max_tokens=60)
    holder.start()
    wait_for(lambda: load(service)["ongoing"] == 1)
    headers = {**rid("early"), "Authorization": f"Bearer {KEYS['early']}"}
    body = {"model": MODEL, "messages": user("hi"), "stream": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{service.url}/v1/chat/completions", json=body, headers=headers, timeout=0.3)
    request_id = headers["X-ChatStream-Request-Id"]
    assert outcome(service, request_id) == "client_disconnected_before_streaming"
    holder.join(30)
    wait_for(lambda: idle(service))


def test_an_engine_failure_is_a_500_or_an_sse_error_event_and_unknown_error(service):
    client = sdk(service, "fail")
    headers = rid("fail")
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=user(f"{FAIL_MARKER} now"), max_tokens=5, extra_headers=headers
        )
    assert caught.value.code == "unknown_error_occurred"
    assert outcome(service, headers) == "unknown_error_occurred"

    headers = rid("fail-sse")
    stream = client.chat.completions.create(
        model=MODEL, messages=user(f"{FAIL_MARKER} now"), max_tokens=5, stream=True,
        extra_headers=headers,
    )  # fmt: skip
    with pytest.raises(openai.APIError, match="generation failed"):
        list(stream)
    assert outcome(service, headers) == "unknown_error_occurred"
    wait_for(lambda: idle(service))


# --------------------------------------------------------------------------- per-key limits
def test_a_key_over_its_token_budget_gets_429_while_another_key_is_served(service):
    client = sdk(service, "budget")
    used = answered = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(5):
            answer = client.chat.completions.create(
                model=MODEL, messages=user("spend"), max_tokens=100
            )
            used += answer.usage.total_tokens
            answered += 1
    assert used >= TOKEN_BUDGET
    error = caught.value
    assert error.code == "tokens_per_minute_exceeded"
    retry_after = int(error.response.headers["Retry-After"])
    assert 30 <= retry_after <= 60  # the oldest request leaves the 60 s window then
    assert 0 < int(error.response.headers["retry-after-ms"]) <= 60_000

    other = sdk(service, "other").chat.completions.create(
        model=MODEL, messages=user("still here"), max_tokens=2
    )
    assert other.choices[0].message.content == "still here"
    usage = key_usage(service.url, "budget", answered, ADMIN)
    assert usage["rejections"] == {"tokens_per_minute_exceeded": 1}
    assert usage["total_tokens"] == used


def test_a_key_at_its_stream_limit_is_refused_without_taking_a_queue_place(service):
    wait_for(lambda: idle(service))
    holder = Holder(service, "solo", max_tokens=100)
    holder.start()
    wait_for(lambda: load(service)["ongoing"] == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(service, "solo").chat.completions.create(model=MODEL, messages=user("me too"))
    assert caught.value.code == "concurrency_limit_exceeded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert load(service)["queued"] == 0  # refused before ChatStream's queue
    # The queue place is still there for another key: it waits in it, then is served.
    other = sdk(service, "solo2").chat.completions.create(
        model=MODEL, messages=user("my turn"), max_tokens=2
    )
    assert other.choices[0].message.content == "my turn"
    holder.join(30)


def prometheus_lines() -> list[str]:
    targets = json.loads(PROMETHEUS_DISCOVERY.read_text())[0]["targets"]
    lines = []
    for target in targets:
        with contextlib.suppress(httpx.HTTPError):
            lines += httpx.get(f"http://{target}/metrics", timeout=5).text.splitlines()
    return lines


def test_usage_adds_up_to_what_the_clients_received(service):
    client = sdk(service, "sum")
    prompt = completion = 0
    for max_tokens in (3, 5):
        answer = client.chat.completions.create(
            model=MODEL, messages=user("count these"), max_tokens=max_tokens
        )
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=user("count these"), max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    last = list(stream)[-1]
    prompt += last.usage.prompt_tokens
    completion += last.usage.completion_tokens

    usage = key_usage(service.url, "sum", 3, ADMIN)
    assert usage["requests"] == {"success": 3}
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)

    def exported() -> dict[str, float] | None:
        found = {}
        for line in prometheus_lines():
            if line.startswith("ray_chatstream_api_key_tokens_total{") and 'key_id="sum"' in line:
                kind = "prompt" if 'kind="prompt"' in line else "completion"
                found[kind] = float(line.rsplit(" ", 1)[1])
        return found if found == {"prompt": prompt, "completion": completion} else None

    wait_for(exported, timeout_s=60, interval_s=2)


# --------------------------------------------------------------------------- admin token
ADMIN_PATHS = ["/outcomes", "/outcomes/ledger", "/load", "/resource_usage", "/v1/usage"]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_admin_endpoints_need_the_admin_token(service, path):
    url = service.url + path
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    wrong = httpx.get(url, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    api_key = httpx.get(url, headers={"Authorization": f"Bearer {KEYS['sync']}"})
    assert api_key.status_code == 403  # an API key is no admin token
    assert httpx.get(url, headers=ADMIN).status_code == 200
    assert admin_headers(ADMIN_TOKEN) == ADMIN


def test_health_stays_open(service):
    assert httpx.get(service.url + "/healthz").status_code == 200


# --------------------------------------------------------------------------- defaults
@pytest.fixture(scope="module")
def plain_service():
    with LocalServe({"engine": "mock", "max_new_tokens": 4}) as server:
        yield server


def test_without_keys_or_token_v1_is_open_and_admin_endpoints_answer_loopback_only(
    plain_service,
):
    client = openai.OpenAI(base_url=f"{plain_service.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=user("open door"))
    assert answer.choices[0].message.content == "open door"
    assert key_usage(plain_service.url, "anonymous", 1)["requests"] == {"success": 1}
    assert httpx.get(f"{plain_service.url}/v1/usage").json()["api_keys"] is False
    assert httpx.get(f"{plain_service.url}/load").status_code == 200
    # The same request as forwarded by a reverse proxy on this host for a remote client.
    forwarded = httpx.get(f"{plain_service.url}/load", headers={"X-Forwarded-For": "203.0.113.7"})
    assert forwarded.status_code == 403 and forwarded.json()["error"] == "forbidden"
