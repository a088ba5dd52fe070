"""Fixtures shared by the test suite: a real Redis (Debian's redis-server) on loopback."""

from __future__ import annotations

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
