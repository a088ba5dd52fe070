"""The Redis store's end-to-end state tests (tests/test_state_redis.py) on a 3-node Redis
Cluster (`CHATSTREAM_REDIS_URL=redis+cluster://...`, redis-cli --cluster create on loopback):
the conversation and cookie survive a full restart of Serve and Ray, a second turn gets 409, a
clear during a stream stays cleared, and concurrent changes to one session lose nothing, with
two ingress replicas. The tests are test_state_redis's own, run against this module's
fixtures (`redis` here is the cluster). The fault tests (Redis stopped, an ingress replica
killed) stay on one server there; a cluster node's loss is tested at the store level
(tests/test_redis_shapes.py)."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisClusterServers
from tests.test_state_redis import (  # noqa: F401 - collected here, with this module's fixtures
    client,
    serve,
    test_a_second_turn_while_one_streams_is_refused_with_409,
    test_clear_during_a_stream_stays_cleared,
    test_concurrent_changes_to_one_session_while_an_answer_lands_lose_nothing,
    test_conversation_and_cookie_survive_a_full_restart_of_serve_and_ray,
)


@pytest.fixture(scope="module")
def redis():
    with RedisClusterServers(masters=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def service(redis):
    with serve(redis, ingress_replicas=2) as server:
        yield server
