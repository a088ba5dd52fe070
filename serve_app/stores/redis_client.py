"""The redis-py client for each shape of Redis (see `redis_url`): one server, a Redis Cluster
(redis-py's cluster client follows MOVED/ASK) or a primary behind Sentinel; and the errors
that mean "unreachable for now" (a failover under way included)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection
from redis.exceptions import ClusterError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve_app.stores.redis_url import RedisTarget

# A stuck Redis must not hold a request for long: fail, answer 503, let the client retry.
SOCKET_TIMEOUT_SEC = 2.0

UNAVAILABLE = (
    RedisConnectionError,  # also a failed-over Sentinel primary ("now a slave")
    RedisTimeoutError,
    OSError,
    ReadOnlyError,  # a primary demoted to replica under us: a failover is under way
    ClusterError,  # ClusterDownError, MasterDownError: a slot without a primary for now
    TryAgainError,  # a cluster slot being migrated
    RedisClusterException,  # no cluster node answers
)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that Sentinel names now, on every (re)connect.

    redis-py 7.4's asyncio client reconnects a dropped connection inside a command's retry
    (`send_packed_command` -> `connect_check_health`) to the host and port it had, skipping
    the Sentinel lookup. After a failover that is the old primary: once restarted, it serves as
    a primary for some seconds until the sentinels make it a replica, and what was written to
    it meanwhile is then discarded (seen in a load test: rejections counted after the failover
    went missing). Asking the sentinels first sends every reconnect to the current primary."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


class _PrimarySSLConnection(_PrimaryConnection, SentinelManagedSSLConnection):
    pass


def make_client(target: RedisTarget) -> tuple[Any, Sentinel | None]:
    """The redis-py client for `target`, and the Sentinel client behind it, if any."""
    timeouts = {
        "socket_timeout": SOCKET_TIMEOUT_SEC,
        "socket_connect_timeout": SOCKET_TIMEOUT_SEC,
    }
    if target.mode == "standalone":
        client = aioredis.Redis.from_url(
            target.url, health_check_interval=10, decode_responses=True, **timeouts
        )
        return client, None
    auth = {"username": target.username, "password": target.password}
    if target.mode == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            ssl=target.ssl,
            decode_responses=True,
            **auth,
            **timeouts,
        )
        return cluster, None
    sentinel_kwargs = {
        "username": target.sentinel_username,
        "password": target.sentinel_password,
        "ssl": target.ssl,
        **timeouts,
    }
    sentinel = Sentinel(
        list(target.nodes), sentinel_kwargs=sentinel_kwargs, ssl=target.ssl, **timeouts
    )
    primary = sentinel.master_for(
        target.service,
        connection_class=_PrimarySSLConnection if target.ssl else _PrimaryConnection,
        db=target.db,
        decode_responses=True,
        health_check_interval=10,
        **auth,
    )
    return primary, sentinel
