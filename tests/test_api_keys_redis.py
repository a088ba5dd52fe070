"""Per-key limits and usage shared by every ingress replica, on a real Redis. Most tests build
what each ingress replica builds (its own Redis client, its own `Access`) several times against
one server; the last runs the whole app with two Serve ingress replicas."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from serve_app.access import Access
from serve_app.api_keys import API_KEYS_ENV, QuotaExceeded
from serve_app.background import Background
from serve_app.config import ADMIN_TOKEN_ENV, ChatStreamConfig
from serve_app.local_server import LocalServe
from serve_app.stores import StoreSettings
from serve_app.stores.redis_store import RedisStore
from tests.redis_server import RedisServer

KEYS = {API_KEYS_ENV: "alice:key-alice-0123456789\nbob:key-bob-0123456789"}


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


class Replicas:
    """`n` ingress replicas' stores and access checks against one Redis, in one namespace."""

    def __init__(self, url: str, namespace: str, n: int, **limits: int) -> None:
        config = ChatStreamConfig(engine="mock", **limits)
        background = Background()
        self.stores = [RedisStore(StoreSettings(namespace=namespace), url) for _ in range(n)]
        self.access = [
            Access(
                config,
                environ=KEYS,
                key_state=store.key_state(),
                replica_id=f"replica-{i}",
                background=background,
            )
            for i, store in enumerate(self.stores)
        ]

    async def settle(self) -> None:
        """Let queued releases and usage counts reach Redis."""
        for _ in range(20):
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


async def take_all(replicas: Replicas, key_id: str, attempts: int):
    """`attempts` streams of `key_id` asked for at once, spread over the replicas."""
    tries = [replicas.access[i % len(replicas.access)].take_stream(key_id) for i in range(attempts)]
    return await asyncio.gather(*tries, return_exceptions=True)


@pytest.mark.parametrize("n", [2, 4])
def test_a_key_limited_to_2_streams_gets_exactly_2_over_n_replicas(redis, n):
    async def scenario() -> None:
        replicas = Replicas(redis.url, f"streams{n}", n, api_key_max_concurrent_streams=2)
        results = await take_all(replicas, "alice", 8)
        leases = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, QuotaExceeded)]
        assert len(leases) == 2 and len(refused) == 6
        assert {r.reason for r in refused} == {"concurrency_limit_exceeded"}
        assert all(r.retry_after_s > 0 for r in refused)
        assert len([await replicas.access[-1].take_stream("bob") for _ in range(2)]) == 2
        leases[0].release()  # one freed, on whichever replica: exactly one more fits
        await replicas.settle()
        results = await take_all(replicas, "alice", 4)
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        await replicas.close()

    asyncio.run(scenario())


def test_tokens_per_minute_and_usage_are_counted_over_every_replica(redis):
    async def scenario() -> None:
        replicas = Replicas(redis.url, "tokens", 3, api_key_tokens_per_minute=100)
        first, second, third = replicas.access
        for access, tokens in ((first, (20, 40)), (second, (10, 30))):
            (await access.take_stream("alice")).release()
            access.finished("alice", "success", *tokens)
        await replicas.settle()
        with pytest.raises(QuotaExceeded) as caught:
            await third.take_stream("alice")  # 100 tokens, counted on two other replicas
        assert caught.value.reason == "tokens_per_minute_exceeded"
        assert 55 <= caught.value.retry_after_s <= 60  # the first entry ages out in ~60 s
        third.rejected("alice", caught.value.reason)
        await replicas.settle()
        report = await first.usage_report()
        assert report["scope"] == "cluster"
        alice = report["keys"]["alice"]
        assert alice["requests"] == {"success": 2}
        assert alice["rejections"] == {"tokens_per_minute_exceeded": 1}
        assert (alice["prompt_tokens"], alice["completion_tokens"]) == (30, 70)
        assert alice["now"]["tokens_in_window"] == 100 and alice["now"]["running_streams"] == 0
        assert alice["now"]["tokens_per_minute"] == 100
        await replicas.close()

    asyncio.run(scenario())


def test_streams_of_a_replica_that_died_are_released_by_a_survivor(redis):
    async def scenario() -> None:
        replicas = Replicas(redis.url, "lost", 2, api_key_max_concurrent_streams=2)
        dead, alive = replicas.access
        held = [await dead.take_stream("alice") for _ in range(2)]
        with pytest.raises(QuotaExceeded):
            await alive.take_stream("alice")
        # Only the survivor reports load; the dead replica never did (or its report expired).
        await replicas.stores[1].report_load("replica-1", 1, 0, 0, time.time() + 30)
        assert await alive.release_lost(grace_sec=60) == 0  # too young to be taken for lost
        await asyncio.sleep(0.05)
        assert await alive.release_lost(grace_sec=0.01) == 2
        assert len([await alive.take_stream("alice") for _ in range(2)]) == 2
        assert await alive.release_lost(grace_sec=0.0) == 0  # a live replica's are kept
        assert held  # (the dead replica's lease objects are never released)
        await replicas.close()

    asyncio.run(scenario())


def test_a_stream_cancelled_while_it_is_taken_is_given_back(redis):
    async def scenario() -> None:
        replicas = Replicas(redis.url, "cancel", 1, api_key_max_concurrent_streams=1)
        (access,) = replicas.access
        task = asyncio.ensure_future(access.take_stream("alice"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await replicas.settle()
        (await access.take_stream("alice")).release()  # the one stream is free again
        await replicas.close()

    asyncio.run(scenario())


def test_two_serve_ingress_replicas_admit_exactly_2_streams_of_a_key_limited_to_2(redis):
    """The issue's set-up: alice opens 8 streams at once through Serve's proxy, which spreads
    them over two ingress replicas; before the limits were shared, 4 were admitted."""
    args = {
        "engine": "mock",
        "mock_mode": "long",
        "mock_time_per_token_sec": 0.05,
        "max_new_tokens": 40,
        "session_store": "redis",
        "ingress_replicas": 2,
        "api_key_max_concurrent_streams": 2,
    }
    env = {**KEYS, ADMIN_TOKEN_ENV: "admin-0123456789", "CHATSTREAM_REDIS_URL": redis.url}
    with LocalServe(args, env=env) as server:
        statuses: list[int] = []
        start = threading.Barrier(8)

        def stream() -> None:
            start.wait()
            with httpx.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer key-alice-0123456789"},
                timeout=60,
            ) as response:
                response.read()
                statuses.append(response.status_code)

        threads = [threading.Thread(target=stream) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert sorted(statuses) == [200] * 2 + [429] * 6
        usage = httpx.get(
            f"{server.url}/v1/usage", headers={"Authorization": "Bearer admin-0123456789"}
        ).json()
        assert usage["scope"] == "cluster"
        deadline = time.monotonic() + 10
        while usage["keys"]["alice"]["requests"] != {"success": 2} and time.monotonic() < deadline:
            time.sleep(0.2)
            usage = httpx.get(
                f"{server.url}/v1/usage", headers={"Authorization": "Bearer admin-0123456789"}
            ).json()
        assert usage["keys"]["alice"]["requests"] == {"success": 2}
        assert usage["keys"]["alice"]["rejections"] == {"concurrency_limit_exceeded": 6}
