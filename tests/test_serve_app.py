"""The Serve application end to end, through `serve run` on loopback, with the mock engine.

One service for the whole module: one generation slot and one queue place, so that "waiting for
a slot", "queue full" and "slot freed" are easy to arrange.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_app.local_server import LocalServe
from tests.support import new_request_id, outcome_of, wait_for

TOKEN_SEC = 0.05
FAIL_MARKER = "PLEASE-FAIL"
PROMETHEUS_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "round",  # repeats the user's words up to max_new_tokens
    "mock_time_per_token_sec": TOKEN_SEC,
    "mock_fail_marker": FAIL_MARKER,
    "max_ongoing_requests": 1,
    "max_queued_requests": 1,
    "max_context_tokens": 200,
    "max_new_tokens": 8,
    "retry_after_sec": 2,
    "max_new_sessions": 20,  # small, so that a flood of new clients is cheap to make
}


@pytest.fixture(scope="module")
def service():
    with LocalServe(SERVICE_ARGS) as server:
        yield server


@pytest.fixture
def client(service):
    """A fresh browser-like client: its own cookie jar, so its own session."""
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def chat(client: httpx.Client, user_input: str | None, **fields) -> httpx.Response:
    body = {"user_input": user_input, **fields} if user_input is not None else fields
    return client.post("/chat_stream", json=body)


def idle(service) -> bool:
    load = httpx.get(f"{service.url}/load").json()
    return load["ongoing"] == 0 and load["queued"] == 0


class LongStream(threading.Thread):
    """A client that holds the generation slot while it reads a long answer to the end."""

    def __init__(self, service, max_new_tokens: int = 60) -> None:
        super().__init__(daemon=True)
        self.url = service.url
        self.max_new_tokens = max_new_tokens
        self.request_id = new_request_id("long")
        self.text = ""

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            response = c.post(
                "/chat_stream",
                json={"user_input": "busy", "max_new_tokens": self.max_new_tokens},
                headers={"X-ChatStream-Request-Id": self.request_id},
            )
            self.text = response.text


# --------------------------------------------------------------------------- streaming
def test_answer_streams_chunk_by_chunk_before_it_is_complete(client):
    arrivals = []
    with client.stream(
        "POST", "/chat_stream", json={"user_input": "one two three", "max_new_tokens": 9}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers["X-ChatStream-Last-Generated-Message-Id"]
        for chunk in response.iter_text():
            arrivals.append((time.monotonic(), chunk))
    text = "".join(chunk for _, chunk in arrivals)
    assert text == "one two three one two three one two three"
    assert len(arrivals) > 3  # not one buffered blob
    assert arrivals[0][0] < arrivals[-1][0]


# --------------------------------------------------------------------------- the four outcomes
def test_success_is_recorded_once(service, client):
    request_id = new_request_id("ok")
    response = client.post(
        "/chat_stream",
        json={"user_input": "hello", "max_new_tokens": 2},
        headers={"X-ChatStream-Request-Id": request_id},
    )
    assert response.text == "hello hello"
    assert response.headers["X-ChatStream-Request-Id"] == request_id
    assert outcome_of(service.url, request_id) == "success"


def test_disconnect_mid_stream_is_recorded_and_partial_answer_kept(service, client):
    request_id = new_request_id("mid")
    with client.stream(
        "POST",
        "/chat_stream",
        json={"user_input": "partial", "max_new_tokens": 100},
        headers={"X-ChatStream-Request-Id": request_id},
    ) as response:
        first = next(response.iter_text())
    assert outcome_of(service.url, request_id) == "client_disconnected_while_streaming"
    answer = client.get("/history").json()["messages"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"].startswith(first.strip()) or first.strip() in answer["content"]
    assert len(answer["content"].split()) < 100  # partial, not the whole answer
    wait_for(lambda: idle(service))


def test_disconnect_while_waiting_for_a_slot(service):
    holder = LongStream(service, max_new_tokens=40)
    holder.start()
    wait_for(lambda: httpx.get(f"{service.url}/load").json()["ongoing"] == 1)
    request_id = new_request_id("early")
    impatient = httpx.Timeout(30, read=0.5)  # gives up long before the slot frees
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=impatient) as c:
        c.post(
            f"{service.url}/chat_stream",
            json={"user_input": "waiting"},
            headers={"X-ChatStream-Request-Id": request_id},
        )
    assert outcome_of(service.url, request_id) == "client_disconnected_before_streaming"
    holder.join(timeout=30)
    assert outcome_of(service.url, holder.request_id) == "success"
    wait_for(lambda: idle(service))


def test_engine_failure_is_unknown_error_and_cuts_the_stream(service, client):
    request_id = new_request_id("fail")
    failing = client.stream(
        "POST",
        "/chat_stream",
        json={"user_input": f"{FAIL_MARKER} now", "max_new_tokens": 5},
        headers={"X-ChatStream-Request-Id": request_id},
    )
    # The stream ends without its final chunk: the client sees a broken response.
    with pytest.raises(httpx.HTTPError), failing as response:
        for _ in response.iter_text():
            pass
    assert outcome_of(service.url, request_id) == "unknown_error_occurred"
    wait_for(lambda: idle(service))


# --------------------------------------------------------------------------- admission control
def test_full_queue_answers_429_and_takes_nothing(service):
    holder = LongStream(service, max_new_tokens=40)
    holder.start()
    wait_for(lambda: httpx.get(f"{service.url}/load").json()["ongoing"] == 1)
    queued = LongStream(service, max_new_tokens=2)
    queued.start()
    wait_for(lambda: httpx.get(f"{service.url}/load").json()["queued"] == 1)

    request_id = new_request_id("refused")
    before = httpx.get(f"{service.url}/outcomes").json()
    refused = httpx.post(
        f"{service.url}/chat_stream",
        json={"user_input": "one more"},
        headers={"X-ChatStream-Request-Id": request_id},
    )
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_requests"
    assert refused.headers["Retry-After"] == "2"

    holder.join(timeout=30)
    queued.join(timeout=30)
    assert queued.text == "busy busy"  # the queued request was served once the slot freed
    after = httpx.get(f"{service.url}/outcomes").json()
    assert (
        after["rejections"]["too_many_requests"]
        == before["rejections"].get("too_many_requests", 0) + 1
    )
    ledger = httpx.get(f"{service.url}/outcomes/ledger", params={"request_id": request_id}).json()
    assert ledger == {"outcomes": {}, "rejections": {request_id: "too_many_requests"}}
    wait_for(lambda: idle(service))


def test_a_disconnect_frees_the_slot_for_the_next_request_at_once(service, client):
    # The abandoned answer would take 200 * 50 ms = 10 s if its slot were not freed.
    with client.stream(
        "POST", "/chat_stream", json={"user_input": "abandon", "max_new_tokens": 200}
    ) as response:
        next(response.iter_text())
    started = time.monotonic()
    follow_up = chat(client, "next", max_new_tokens=2)
    assert follow_up.status_code == 200
    assert follow_up.text == "next next"
    assert time.monotonic() - started < 5
    wait_for(lambda: idle(service))


# --------------------------------------------------------------------------- sessions
def test_two_sessions_do_not_see_each_other(service):
    with (
        httpx.Client(base_url=service.url, timeout=30) as alice,
        httpx.Client(base_url=service.url, timeout=30) as bob,
    ):
        chat(alice, "apples", max_new_tokens=1)
        chat(bob, "bananas", max_new_tokens=1)
        alice_history = alice.get("/history").json()["messages"]
        bob_history = bob.get("/history").json()["messages"]
    assert [m["content"] for m in alice_history] == ["apples", "apples"]
    assert [m["content"] for m in bob_history] == ["bananas", "bananas"]
    cookie = alice.cookies.get("chatstream_session")
    assert cookie  # signed session id, set by the server


def test_session_cookie_is_httponly_and_forged_cookie_gets_a_new_session(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        response = chat(c, "remember me", max_new_tokens=1)
        assert "httponly" in response.headers["set-cookie"].lower()
        c.cookies.set("chatstream_session", "forged-value")
        assert c.get("/history").json()["messages"] == []


def test_multi_turn_history_reaches_the_prompt(client):
    chat(client, "first question", max_new_tokens=2)
    chat(client, "second question", max_new_tokens=2)
    messages = client.get("/history").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    prompt = client.get("/prompt").json()["prompt"]
    assert "first question" in prompt and "second question" in prompt


def test_regenerate_replaces_the_last_answer(client):
    chat(client, "alpha beta", max_new_tokens=2)
    first = client.get("/history").json()["messages"]
    response = chat(client, None, regenerate=True, max_new_tokens=4)
    assert response.text == "alpha beta alpha beta"
    second = client.get("/history").json()["messages"]
    assert len(second) == len(first) == 2
    assert second[-1]["content"] == "alpha beta alpha beta"
    assert second[-1]["message_id"] != first[-1]["message_id"]
    assert second[-1]["message_id"] == response.headers["X-ChatStream-Last-Generated-Message-Id"]


def test_clear_context_empties_history_and_regenerate_then_refused(client):
    chat(client, "something", max_new_tokens=1)
    assert client.post("/clear_context").json() == {"cleared": True}
    assert client.get("/history").json()["messages"] == []
    refused = chat(client, None, regenerate=True)
    assert refused.status_code == 409
    assert refused.json()["error"] == "nothing_to_regenerate"


def test_long_history_drops_oldest_turns_to_fit_the_context(client):
    for index in range(6):
        chat(client, f"turn{index} " + "word " * 30, max_new_tokens=1)
    messages = client.get("/history").json()["messages"]
    assert messages[-2]["content"].startswith("turn5")
    assert not any(m["content"].startswith("turn0") for m in messages)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("body", "status", "error", "names"),
    [
        (b"{not json", 400, "invalid_json", "JSON"),
        (b"[1, 2]", 400, "invalid_json", "object"),
        (b"{}", 400, "invalid_request", "user_input"),
        (b'{"user_input": "   "}', 400, "invalid_request", "user_input"),
        (b'{"user_input": 42}', 400, "invalid_request", "user_input"),
        (b'{"user_input": "hi", "regenerate": "yes"}', 400, "invalid_request", "regenerate"),
        (b'{"user_input": "hi", "temperature": 9}', 400, "invalid_request", "temperature"),
        (b'{"user_input": "hi", "top_k": "many"}', 400, "invalid_request", "top_k"),
        (b'{"user_input": "hi", "top_p": 0}', 400, "invalid_request", "top_p"),
        (b'{"user_input": "hi", "max_new_tokens": 0}', 400, "invalid_request", "max_new_tokens"),
        (b'{"user_input": "' + b"word " * 300 + b'"}', 413, "prompt_too_long", "context"),
        (b'{"user_input": "hi", "temperature": 1e-300}', 400, "invalid_request", "temperature"),
        (b'{"user_input": "hi", "top_p": NaN}', 400, "invalid_request", "top_p"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "invalid_json", "deeper"),
        (b'{"user_input": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "invalid_json", "deeper"),
        (b'{"user_input": "' + b"x" * 1_100_000 + b'"}', 413, "body_too_large", "bytes"),
    ],
)
def test_bad_input_is_refused_before_admission(service, body, status, error, names):
    before = httpx.get(f"{service.url}/outcomes").json()
    request_id = new_request_id("bad")
    response = httpx.post(
        f"{service.url}/chat_stream",
        content=body,
        headers={"content-type": "application/json", "X-ChatStream-Request-Id": request_id},
    )
    assert response.status_code == status
    assert response.json()["error"] == error
    assert names in response.json()["message"]
    after = httpx.get(f"{service.url}/outcomes").json()
    assert after["admitted"] == before["admitted"]  # no callback, no outcome
    ledger = httpx.get(f"{service.url}/outcomes/ledger", params={"request_id": request_id}).json()
    assert ledger["rejections"] == {request_id: error}
    assert idle(service)


def test_two_clients_with_the_same_request_id_do_not_overwrite_each_other(service):
    shared = new_request_id("same")
    keys = []
    for text in ("first client", "second client"):
        with httpx.Client(base_url=service.url, timeout=30) as c:
            response = c.post(
                "/chat_stream",
                json={"user_input": text, "max_new_tokens": 1},
                headers={"X-ChatStream-Request-Id": shared},
            )
            assert response.status_code == 200
            keys.append(response.headers["X-ChatStream-Request-Id"])
    assert keys[0] == shared and keys[1].startswith(shared + "~")
    for key in keys:
        assert outcome_of(service.url, key) == "success"


def test_oversized_headers_are_refused_before_admission(service):
    response = httpx.post(
        f"{service.url}/chat_stream", json={"user_input": "hi"}, headers={"X-Big": "a" * 70_000}
    )
    assert response.status_code == 431 and response.json()["error"] == "headers_too_large"
    assert idle(service)


def test_malformed_request_id_is_refused(service):
    response = httpx.post(
        f"{service.url}/chat_stream",
        json={"user_input": "hi"},
        headers={"X-ChatStream-Request-Id": "not ok/with spaces"},
    )
    assert response.status_code == 400
    assert "X-ChatStream-Request-Id" in response.json()["message"]


# --------------------------------------------------------------------------- the other endpoints
def test_generation_params_are_per_session_and_validated(service, client):
    defaults = client.get("/generation_params").json()
    assert defaults == {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 8}
    updated = client.put("/generation_params", json={"temperature": 0.1, "max_new_tokens": 3})
    assert updated.json()["temperature"] == 0.1
    assert chat(client, "x y").text == "x y x"  # the session's max_new_tokens applies
    bad = client.put("/generation_params", json={"top_p": 1.5})
    assert bad.status_code == 400 and "top_p" in bad.json()["message"]
    with httpx.Client(base_url=service.url) as other:
        assert other.get("/generation_params").json() == defaults


def test_first_contact_put_of_generation_params_keeps_its_session(service):
    with httpx.Client(base_url=service.url, timeout=30) as fresh:
        assert fresh.put("/generation_params", json={"top_k": 7}).json()["top_k"] == 7
        assert fresh.get("/generation_params").json()["top_k"] == 7


def test_reading_without_a_cookie_creates_no_session(service):
    with httpx.Client(base_url=service.url, timeout=30) as fresh:
        for path in ("/generation_params", "/history", "/prompt"):
            response = fresh.get(path)
            assert response.status_code == 200 and "set-cookie" not in response.headers, path
        assert fresh.post("/clear_context").headers.get("set-cookie") is None


def test_a_flood_of_new_clients_does_not_evict_a_conversation(service, client):
    assert chat(client, "keep me", max_new_tokens=1).status_code == 200
    before = client.get("/history").json()["messages"]
    for index in range(3 * SERVICE_ARGS["max_new_sessions"]):  # each a new session
        httpx.put(f"{service.url}/generation_params", json={"top_k": index + 1})
    assert client.get("/history").json()["messages"] == before


def test_every_response_refreshes_the_cookie_so_it_expires_from_last_use(client):
    assert chat(client, "hello", max_new_tokens=1).status_code == 200
    first = client.cookies["chatstream_session"]
    time.sleep(1.1)  # the signature carries its time in whole seconds
    response = client.get("/history")
    assert "max-age=86400" in response.headers["set-cookie"].lower()
    assert client.cookies["chatstream_session"] != first  # re-signed now


def test_the_conversation_survives_a_restart_of_the_shared_state_actor(service, client):
    from loadtest.fault import gcs_address_for_port

    assert chat(client, "survive the actor", max_new_tokens=1).status_code == 200
    history = client.get("/history").json()["messages"]
    totals = httpx.get(f"{service.url}/outcomes").json()
    killed = subprocess.run(
        [sys.executable, "-m", "loadtest.fault", "--kind", "state-actor"]
        + ["--address", gcs_address_for_port(service.port), "--recovery-timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(killed.stdout.strip().splitlines()[-1])["recovered"], killed.stderr[-2000:]
    # Until the ingress's handle reaches the restarted actor, it answers 503 store_unavailable.
    wait_for(lambda: client.get("/history").status_code == 200, 30, 0.5)
    assert client.get("/history").json()["messages"] == history  # the same cookie, too
    after = httpx.get(f"{service.url}/outcomes").json()
    assert after["outcomes"] == totals["outcomes"] and after["rejections"] == totals["rejections"]
    assert chat(client, "and go on", max_new_tokens=1).status_code == 200


def test_feedback_on_a_message_id(client):
    response = chat(client, "rate me", max_new_tokens=1)
    message_id = response.headers["X-ChatStream-Last-Generated-Message-Id"]
    ok = client.post("/feedback", json={"message_id": message_id, "rating": "good"})
    assert ok.json() == {"recorded": True}
    unknown = client.post("/feedback", json={"message_id": "nope", "rating": "good"})
    assert unknown.status_code == 404
    bad = client.post("/feedback", json={"message_id": message_id, "rating": "meh"})
    assert bad.status_code == 400 and "rating" in bad.json()["message"]


def test_load_resource_usage_and_outcome_totals(service, client):
    wait_for(lambda: idle(service))
    load = client.get("/load").json()
    fair = load.pop("fair_queue")
    routing = load.pop("routing")  # this ingress's model calls by routing decision
    assert set(routing) <= {"affine"}  # one model replica: never a fallback
    assert load == {"ongoing": 0, "queued": 0, "capacity": 1, "max_queued": 1}
    assert fair == {"capacity": 1, "in_flight": 0, "waiting": 0, "max_waiting": 1, "tenants": {}}
    usage = client.get("/resource_usage").json()
    assert usage["memory"]["total_bytes"] > 0 and usage["cluster"]["total"]["CPU"] > 0
    totals = client.get("/outcomes").json()
    assert set(totals["outcomes"]) == {
        "success",
        "client_disconnected_while_streaming",
        "client_disconnected_before_streaming",
        "unknown_error_occurred",
    }
    assert totals["admitted"] == sum(totals["outcomes"].values())


def test_outcomes_rejections_and_ttft_are_prometheus_metrics(client):
    """Ray exports our custom metrics on each node's metrics port (found via Ray's Prometheus
    service-discovery file); they show up after Ray's reporting interval."""
    chat(client, "count me", max_new_tokens=1)
    client.post("/chat_stream", content=b"{oops")
    wanted = (
        "ray_chatstream_outcomes_total{",
        "ray_chatstream_rejections_total{",
        "ray_chatstream_time_to_first_token_seconds_bucket{",
        "ray_chatstream_generated_tokens_total{",
    )

    def exported() -> list[str]:
        targets = json.loads(PROMETHEUS_DISCOVERY.read_text())[0]["targets"]
        lines = []
        for target in targets:
            with contextlib.suppress(httpx.HTTPError):
                lines += httpx.get(f"http://{target}/metrics", timeout=5).text.splitlines()
        found = [prefix for prefix in wanted if any(line.startswith(prefix) for line in lines)]
        success = [line for line in lines if line.startswith(wanted[0]) and "success" in line]
        return len(found) == len(wanted) and success

    (success_line, *_) = wait_for(exported, timeout_s=60, interval_s=2)
    assert 'outcome="success"' in success_line
