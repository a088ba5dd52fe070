"""The Redis store's end-to-end state tests (tests/test_state_redis.py) on a 3-node Redis
Cluster (`CHATSTREAM_REDIS_URL=redis+cluster://...`, redis-cli --cluster create on loopback),
with two ingress replicas: a second turn gets 409, a clear during a stream stays cleared, and
concurrent changes to one session lose nothing. The tests are test_state_redis's own, run
against this module's fixtures (`redis` here is the cluster).

Left on one server (test_state_redis), to keep the suite short: the full restart of Serve and
Ray (two more starts, about a minute; what it relies on, the records and the signing key kept
in Redis for a new store object, is checked on the cluster at the store level in
tests/test_redis_shapes.py) and the fault tests (Redis stopped, an ingress replica killed; a
cluster node's loss is tested at the store level there too)."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisClusterServers
from tests.test_state_redis import (  # noqa: F401 - collected here, with this module's fixtures
    client,
    serve,
    test_a_second_turn_while_one_streams_is_refused_with_409,
    test_clear_during_a_stream_stays_cleared,
    test_concurrent_changes_to_one_session_while_an_answer_lands_lose_nothing,
)


@pytest.fixture(scope="module")
def redis():
    with RedisClusterServers(masters=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def service(redis):
    with serve(redis, ingress_replicas=2) as server:
        yield server
