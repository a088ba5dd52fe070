"""Start-up checks of the Redis store: the URL fits the server, and the server takes writes.

A cluster behind a plain URL, a plain server behind a cluster URL, a read-only replica, an
unknown Sentinel service, refused credentials or a Redis that cannot be reached are refused
with one line (`StoreMisconfigured`) that names the setting and says what to set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import (
    AskError,
    AuthenticationError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve_app.stores.base import StoreMisconfigured, StoreUnavailable
from serve_app.stores.redis_client import UNAVAILABLE
from serve_app.stores.redis_url import RedisTarget

logger = logging.getLogger("ray.serve")

# How long `verify` waits for an unreachable Redis before it refuses.
VERIFY_WAIT_SEC = 10.0


@dataclass(frozen=True)
class Redis:
    """What the checks need of a store: its clients, where it points and how it is named."""

    client: Any
    sentinel: Sentinel | None
    target: RedisTarget
    setting_name: str
    probe_key: str  # written once, to prove the server takes writes
    ready: Callable[[], Awaitable[None]]  # a cluster client learns its slots


async def verify(redis: Redis, wait_sec: float = VERIFY_WAIT_SEC) -> None:
    """Check once, at start, that the URL fits the server and that it takes writes.
    Waits up to `wait_sec` for a Redis that cannot be reached yet; raises
    `StoreMisconfigured` with one line that says what to set."""
    deadline = time.monotonic() + wait_sec
    while True:
        try:
            await check_once(redis)
            return
        except StoreUnavailable as exc:
            if time.monotonic() >= deadline:
                raise StoreMisconfigured(
                    f"{redis.setting_name}: cannot reach Redis at {redis.target.describe()} "
                    f"within {wait_sec:g} s ({exc.__cause__ or exc}); check the host, port "
                    "and that it runs"
                ) from None
            await asyncio.sleep(0.5)


def _refuse(redis: Redis, what: str) -> StoreMisconfigured:
    return StoreMisconfigured(f"{redis.setting_name}: {redis.target.describe()} {what}")


async def check_once(redis: Redis) -> None:
    """One check, no waiting: StoreMisconfigured for a misfit, StoreUnavailable if unreachable."""
    target = redis.target
    try:
        await redis.ready()
        if target.mode == "sentinel":
            await _verify_sentinel(redis)
        # A cluster client already refused a node without cluster mode; its INFO would be
        # one random node's (perhaps a replica's): only the write probe below applies.
        info = {} if target.mode == "cluster" else await _info(redis)
        if target.mode == "standalone" and str(info.get("cluster_enabled", "0")) == "1":
            raise _refuse(
                redis,
                "is a Redis Cluster node: set it to redis+cluster://<host>:<port> (the same "
                "credentials) so that the client follows the cluster's slots",
            )
        if info.get("role") == "slave":
            primary = f"{info.get('master_host')}:{info.get('master_port')}"
            raise _refuse(
                redis,
                f"is a read-only replica (of {primary}): point it at the primary, or at the "
                "sentinels with redis+sentinel://<sentinel>:26379/<service>",
            )
        # A write proves the rest (a replica that hides its role, an ACL that forbids it).
        await redis.client.set(redis.probe_key, str(time.time()), px=60_000)
        if target.wait_replicas:
            replicas = int(info.get("connected_slaves", target.wait_replicas))
            if replicas < target.wait_replicas:
                logger.warning(
                    "%s has %d replicas connected, fewer than wait_replicas=%d: outcome "
                    "writes fail (and are retried) until enough replicas are back",
                    target.describe(),
                    replicas,
                    target.wait_replicas,
                )
    except AuthenticationError as exc:
        raise _refuse(
            redis, f"refused the credentials ({exc}): check the user and password"
        ) from None
    except ReadOnlyError:
        raise _refuse(
            redis,
            "is read-only (a replica): point it at the primary, or at the sentinels with "
            "redis+sentinel://<sentinel>:26379/<service>",
        ) from None
    except AskError:  # MOVED: INFO was not allowed, the write probe found the cluster
        raise _refuse(
            redis,
            "is a Redis Cluster node: set it to redis+cluster://<host>:<port> (the same "
            "credentials) so that the client follows the cluster's slots",
        ) from None
    except NoPermissionError as exc:
        raise _refuse(
            redis, f"does not let this user write ({exc}): grant it the keys chatstream:*"
        ) from None
    except RedisClusterException as exc:
        if "not enabled" in str(exc):
            raise _refuse(
                redis,
                "is not a Redis Cluster (cluster mode is off): use redis://<host>:<port>, "
                "or redis+sentinel://... for a primary with sentinels",
            ) from None
        raise StoreUnavailable(f"Redis Cluster is unreachable: {exc}") from exc
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc!r}") from exc


async def _info(redis: Redis) -> dict[str, Any]:
    """INFO's cluster and replication sections; {} if this user may not run INFO (the
    write probe then decides)."""
    info: dict[str, Any] = {}
    for section in ("cluster", "replication"):
        try:
            found = await redis.client.info(section)
        except NoPermissionError:
            continue
        except ResponseError as exc:
            if "unknown command" in str(exc).lower() or "noperm" in str(exc).lower():
                continue
            raise
        info.update(found)
    return info


async def _verify_sentinel(redis: Redis) -> None:
    assert redis.sentinel is not None
    try:
        await redis.sentinel.discover_master(redis.target.service)
        return
    except MasterNotFoundError as exc:
        reached = []
        for sentinel in redis.sentinel.sentinels:
            try:
                reached.append(await sentinel.sentinel_masters())
            except (RedisConnectionError, RedisTimeoutError, OSError):
                continue
            except ResponseError as error:
                raise _refuse(redis, f"answered {error} (is it a sentinel?)") from None
        if not reached:
            raise StoreUnavailable(f"no sentinel answers: {exc}") from exc
        known = sorted({name for masters in reached for name in masters})
        if redis.target.service not in known:
            raise _refuse(
                redis,
                f"has no service {redis.target.service!r} (the sentinels monitor: "
                f"{', '.join(known) or 'nothing'}): set the service name after the hosts",
            ) from None
        raise StoreUnavailable(f"the sentinels know no live primary: {exc}") from exc
