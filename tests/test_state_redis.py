"""The Redis store end to end: `serve run` with `session_store=redis` against a real
redis-server (durable: append-only file), the mock engine, loopback only.

What a user would notice: the conversation and the cookie survive a full stop and start of
Serve and Ray, and the kill of an ingress replica, whose requests a survivor closes as
`unknown_error_occurred` (`ingress_lost`); concurrent changes to one session lose
nothing; a session has one turn at a time; Redis going away costs new requests a 503 but never
an outcome, and the service recovers by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest

from serve_app.local_server import LocalServe
from tests.redis_server import RedisServer
from tests.support import new_request_id, outcome_of, wait_for

TOKEN_SEC = 0.05
SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "round",
    "mock_time_per_token_sec": TOKEN_SEC,
    "session_store": "redis",
    "max_ongoing_requests": 8,
    "max_new_tokens": 6,
}


@pytest.fixture(scope="module")
def redis():
    with RedisServer(durable=True) as server:
        yield server


def serve(redis: RedisServer, **args) -> LocalServe:
    return LocalServe({**SERVICE_ARGS, **args}, env={"CHATSTREAM_REDIS_URL": redis.url})


def chat(client: httpx.Client, text: str, request_id: str | None = None, **fields):
    headers = {"X-ChatStream-Request-Id": request_id} if request_id else {}
    return client.post("/chat_stream", json={"user_input": text, **fields}, headers=headers)


class Stream(threading.Thread):
    """One chat turn read to the end in the background (a long answer)."""

    def __init__(self, client: httpx.Client, text: str, max_new_tokens: int = 40) -> None:
        super().__init__(daemon=True)
        self.client, self.user_input, self.max_new_tokens = client, text, max_new_tokens
        self.request_id = new_request_id("stream")
        self.first_chunk = threading.Event()
        self.status_code: int | None = None  # None: the connection broke
        self.text = ""

    def run(self) -> None:
        body = {"user_input": self.user_input, "max_new_tokens": self.max_new_tokens}
        headers = {"X-ChatStream-Request-Id": self.request_id}
        try:
            with self.client.stream("POST", "/chat_stream", json=body, headers=headers) as r:
                for chunk in r.iter_text():
                    self.text += chunk
                    self.first_chunk.set()
                self.status_code = r.status_code
        except httpx.TransportError:  # a cut stream, which the tests look for: status None
            return


def first_chunk_seen(client: httpx.Client, text: str) -> Stream:
    """Start a long turn and return it once its answer has begun; the rest of the answer is
    read in the background."""
    stream = Stream(client, text)
    stream.start()
    assert stream.first_chunk.wait(15), "the answer did not start"
    return stream


def test_conversation_and_cookie_survive_a_full_restart_of_serve_and_ray(redis):
    client = httpx.Client(timeout=30)
    with serve(redis) as service:
        client.base_url = service.url
        assert chat(client, "remember this please").status_code == 200
        before = client.get("/history").json()["messages"]
        outcomes_before = httpx.get(f"{service.url}/outcomes").json()["outcomes"]["success"]
    assert [m["role"] for m in before] == ["user", "assistant"]

    with serve(redis) as service:  # a new Ray cluster, the same Redis, no configured key
        client.base_url = service.url
        assert client.get("/history").json()["messages"] == before
        totals = httpx.get(f"{service.url}/outcomes").json()
        assert totals["outcomes"]["success"] == outcomes_before
        assert chat(client, "and this").status_code == 200
        assert len(client.get("/history").json()["messages"]) == 4
    client.close()


@pytest.fixture(scope="module")
def service(redis):
    with serve(redis, ingress_replicas=2) as server:
        yield server


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def test_history_survives_the_kill_of_an_ingress_replica(service, client):
    assert chat(client, "before the kill").status_code == 200
    before = client.get("/history").json()["messages"]
    kill_ingress_replica(service)
    for _ in range(4):  # whichever replica answers, it is the same conversation
        assert client.get("/history").json()["messages"] == before


def test_requests_of_a_killed_ingress_replica_are_closed_by_a_survivor(service):
    before = httpx.get(f"{service.url}/outcomes").json()
    clients = [httpx.Client(base_url=service.url, timeout=90) for _ in range(6)]
    streams = [Stream(c, f"kill {i}", max_new_tokens=200) for i, c in enumerate(clients)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_chunk.wait(15), httpx.get(f"{service.url}/load").json()
    kill_ingress_replica(service)
    for stream in streams:
        stream.join(60)
    # A cut stream ends early: the client sees an error or fewer than the 200 tokens.
    cut = [s for s in streams if s.status_code is None or len(s.text.split()) < 200]
    assert cut, "no stream was on the killed replica"
    outcomes = {s.request_id: outcome_of(service.url, s.request_id, timeout_s=60) for s in streams}
    for stream in streams:
        expected = "unknown_error_occurred" if stream in cut else "success"
        assert outcomes[stream.request_id] == expected, stream.request_id
    after = httpx.get(f"{service.url}/outcomes").json()
    lost = after["unknown_error_reasons"].get("ingress_lost", 0) - before[
        "unknown_error_reasons"
    ].get("ingress_lost", 0)
    assert lost == len(cut)
    assert after["open"] == 0 and after["admitted"] - before["admitted"] == len(streams)
    for c in clients:
        c.close()


def test_a_second_turn_while_one_streams_is_refused_with_409(service, client):
    stream = first_chunk_seen(client, "long answer")
    second = chat(client, "impatient")
    assert second.status_code == 409 and second.json()["error"] == "turn_in_progress"
    stream.join(30)
    assert stream.status_code == 200
    assert outcome_of(service.url, stream.request_id) == "success"
    history = client.get("/history").json()["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["long answer"]
    assert chat(client, "now my turn").status_code == 200  # the lock went with the answer


def test_clear_during_a_stream_stays_cleared(service, client):
    assert chat(client, "old turn").status_code == 200
    stream = first_chunk_seen(client, "answer lands after the clear")
    assert client.post("/clear_context").json() == {"cleared": True}
    stream.join(30)
    assert stream.status_code == 200
    assert outcome_of(service.url, stream.request_id) == "success"
    assert client.get("/history").json()["messages"] == []


def test_concurrent_changes_to_one_session_while_an_answer_lands_lose_nothing(service, client):
    assert chat(client, "first").status_code == 200
    message_id = client.get("/history").json()["messages"][-1]["message_id"]
    stream = first_chunk_seen(client, "second")
    cookies = dict(client.cookies)

    def change(index: int) -> int:
        with httpx.Client(base_url=service.url, cookies=cookies, timeout=30) as c:
            if index % 2:
                body = {"message_id": message_id, "rating": "good", "comment": f"c{index}"}
                return c.post("/feedback", json=body).status_code
            return c.put("/generation_params", json={"top_k": index + 1}).status_code

    threads = [threading.Thread(target=change, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stream.join(30)
    assert outcome_of(service.url, stream.request_id) == "success"
    history = client.get("/history").json()["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["first", "second"]
    assert history[-1]["role"] == "assistant" and history[-1]["content"]
    params = client.get("/generation_params").json()
    assert params["top_k"] in range(1, 51, 2)  # one of the 25 writes, not the default
    feedback = client.post(
        "/feedback", json={"message_id": message_id, "rating": "bad", "comment": "last"}
    )
    assert feedback.status_code == 200


def test_redis_stopped_mid_run_costs_new_requests_a_503_and_no_outcome(service, redis):
    clients = [httpx.Client(base_url=service.url, timeout=60) for _ in range(3)]
    streams = [Stream(c, f"stream {i}") for i, c in enumerate(clients)]
    for stream in streams:
        stream.start()
    wait_for(lambda: httpx.get(f"{service.url}/load").json()["ongoing"] >= 3, 10)
    redis.stop()
    try:
        for stream in streams:
            stream.join(30)
            assert stream.status_code == 200
            assert stream.text.count("stream") >= 2  # the whole answer arrived
        refused = httpx.post(f"{service.url}/chat_stream", json={"user_input": "hello"}, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"] == "store_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        redis.start()
    # Back without a restart of Serve: the outcomes decided meanwhile are recorded, once each.
    for stream in streams:
        assert outcome_of(service.url, stream.request_id, timeout_s=40) == "success"
    with httpx.Client(base_url=service.url, timeout=30) as c:
        wait_for(lambda: chat(c, "after the outage").status_code == 200, 30, 1.0)
    ledger = httpx.get(
        f"{service.url}/outcomes/ledger", params={"request_id": [s.request_id for s in streams]}
    ).json()
    assert len(ledger["outcomes"]) == 3
    wait_for(lambda: httpx.get(f"{service.url}/load").json()["queued"] == 0)
    for c in clients:
        c.close()


def kill_ingress_replica(service: LocalServe) -> None:
    """Kill one ingress replica with Ray's API and wait until Serve replaced it."""
    from loadtest.fault import gcs_address_for_port

    address = gcs_address_for_port(service.port)
    assert address, "no Ray cluster found behind the service's port"
    killed = subprocess.run(
        [sys.executable, "-m", "loadtest.fault", "--address", address]
        + ["--deployment", "ChatStreamIngress", "--recovery-timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(killed.stdout.strip().splitlines()[-1])
    assert result["recovered"], result
