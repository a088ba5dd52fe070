"""Fixtures shared by the test suite: a real Redis (Debian's redis-server) on loopback, and the
embedded SmolLM2 model on the transformers engine."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, start_redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for a test module (tests keep apart by namespace or key prefix).
    A test that stops or freezes it must leave it running (see `own_redis` otherwise)."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, durable (append-only file, fsync always), free to be
    stopped, killed, frozen and restarted on the same port and directory."""
    server = start_redis(durable=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def smollm2_engine():
    """The embedded SmolLM2 on the transformers engine (default dtype, 8 rows), started once for
    the session: each module that only asks it questions used to load it again (~25 s on 2
    cores). A test must leave it idle; one that needs other settings makes its own engine."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from serve_app.config import ChatStreamConfig
    from serve_app.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(ChatStreamConfig(max_ongoing_requests=8))
    asyncio.run(engine.start())  # the worker thread outlives this loop; streams use their own
    yield engine
    engine.shutdown()
