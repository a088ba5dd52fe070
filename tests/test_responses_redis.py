"""A Responses chain on the Redis store is durable and shared: `previous_response_id`
continues it after a full stop and start of Serve and Ray, and from any ingress replica (one
of two, and the one that replaced a killed replica). The official `openai` SDK, the mock
engine (echo), a real redis-server, loopback only."""

from __future__ import annotations

import openai
import pytest

from serve_app.local_server import LocalServe
from tests.redis_server import RedisServer
from tests.test_state_redis import kill_ingress_replica

MODEL = "mock"
SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "echo",
    "mock_time_per_token_sec": 0.01,
    "session_store": "redis",
    "max_ongoing_requests": 4,
    "max_context_tokens": 2000,
}


@pytest.fixture(scope="module")
def redis():
    with RedisServer(durable=True) as server:
        yield server


def serve(redis: RedisServer, **args) -> LocalServe:
    return LocalServe({**SERVICE_ARGS, **args}, env={"CHATSTREAM_REDIS_URL": redis.url})


def sdk(service: LocalServe) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="none", timeout=30, max_retries=0)


def test_a_chain_continues_after_a_full_restart_of_serve_and_ray(redis):
    with serve(redis) as service:
        first = sdk(service).responses.create(model=MODEL, input="remember this")
    assert first.output_text == "remember this"

    with serve(redis) as service:  # a new Ray cluster, the same Redis
        client = sdk(service)
        assert client.responses.retrieve(first.id).output_text == "remember this"
        follow = client.responses.create(
            model=MODEL, input="and this", previous_response_id=first.id
        )
        assert follow.output_text == "and this"
        assert follow.usage.input_tokens > first.usage.input_tokens  # the history came along
        assert client.responses.retrieve(follow.id).previous_response_id == first.id


def test_a_chain_continues_on_any_ingress_replica(redis):
    with serve(redis, ingress_replicas=2) as service:
        client = sdk(service)
        latest = client.responses.create(model=MODEL, input="turn 0")
        # Serve's proxy spreads these over both replicas; each finds the chain in Redis.
        for turn in range(1, 7):
            if turn == 4:
                kill_ingress_replica(service)  # its replacement, a new process, continues too
            previous = latest
            latest = client.responses.create(
                model=MODEL, input=f"turn {turn}", previous_response_id=previous.id
            )
            assert latest.output_text == f"turn {turn}"
            assert latest.usage.input_tokens > previous.usage.input_tokens
