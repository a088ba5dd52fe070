"""`session_store=redis`: the production store (Redis 7 or Valkey, through redis-py's asyncio
client). It survives restarts of Serve and Ray, upgrades and Ray cluster replacement.

Three shapes of Redis, chosen by the URL (see `redis_url`): one server (`redis://`), a Redis
Cluster (`redis+cluster://`, redis-py's cluster client, which follows MOVED/ASK) and a primary
behind Sentinel (`redis+sentinel://`, the client asks the sentinels for the current primary).

Keys. Every key carries a hash tag (`{...}`), so that each script and each transaction touches
one slot of a cluster. The same layout serves all three shapes:

    chatstream:{<app>}:key               the generated cookie-signing key
    chatstream:{<app>}:load              hash of each ingress replica's load report (JSON)
    chatstream:{<app>}:probe             written at start, to refuse a read-only Redis
    chatstream:{<app>|s<k>}:s:<sid>      a session record as JSON, expiring `session_ttl_sec`
                                         after last use; k = crc32(sid) mod shards
    chatstream:{<app>|s<k>}:new          sorted set of shard k's sessions without history, by
                                         last change (bounded: a flood evicts only these)
    chatstream:{<app>|l<k>}:...          ledger shard k (k = crc32(request id) mod shards):
        totals                           outcome, rejection and unknown-error reason counts
        open / open:keys                 admitted requests without an outcome, by record id /
                                         their ledger keys (a request id in use gets a suffix)
        ledger:o, ledger:order           the newest outcomes by request id (bounded)
        ledger:r, ledger:rorder          the newest rejections by request id (bounded)
        done:<record id>                 marks a counted outcome, so a retried write counts once
    chatstream:{<app>|k:<key id>}:...    one API key's limits and usage (see `redis_quotas`)

One server and Sentinel use one shard (the ledger bound is exact); a cluster uses
`CLUSTER_SHARDS`, so that sessions and the ledger spread over the nodes and the totals are no
single hot key: each shard has its own totals, summed on read. The bounds (`max_new_sessions`,
`ledger_size`) are then kept per shard, each a `1/shards` part (rounded up).

Session changes are compare-and-set: read the record, apply the pure change from
`session_state`, and write it with a script that checks the record is still the one read (by
its SHA-1); if anyone wrote meanwhile, start again from the new record. The ledger and load
board use Lua scripts. Connection failures, failovers (a primary that turned replica, a cluster
slot without a primary) become `StoreUnavailable`; commands time out rather than hang. Where
`wait_replicas` is set (by default behind Sentinel), an outcome counts as written only once
that many replicas have it (`WAIT`), so a failover cannot lose it; session changes and the
generated signing key WAIT too, but a shortfall (a replica down) only logs a warning, so that
conversations go on; rejection counts, open-request marks and load reports do not wait.

`verify()` checks at start that the URL fits the server: a cluster behind a plain URL, a plain
server behind a cluster URL, a read-only replica, an unknown Sentinel service or a Redis that
cannot be reached are refused with one line (`StoreMisconfigured`) that says what to set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import zlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON, Outcome
from serve_app.session_state import Record, SessionChange, apply_change, is_established
from serve_app.stores.base import StateStore, StoreMisconfigured, StoreSettings, StoreUnavailable
from serve_app.stores.redis_quotas import RedisKeyState
from serve_app.stores.redis_url import RedisTarget, parse_redis_url

logger = logging.getLogger("ray.serve")

# A stuck Redis must not hold a request for long: fail, answer 503, let the client retry.
SOCKET_TIMEOUT_SEC = 2.0
DONE_MARK_TTL_SEC = 24 * 3600
# Shards of the session and ledger keys on a Redis Cluster (slots they spread over).
CLUSTER_SHARDS = 32
# How long `verify` waits for an unreachable Redis before it refuses.
VERIFY_WAIT_SEC = 10.0

_UNAVAILABLE = (
    RedisConnectionError,  # also a failed-over Sentinel primary ("now a slave")
    RedisTimeoutError,
    OSError,
    ReadOnlyError,  # a primary demoted to replica under us: a failover is under way
    ClusterError,  # ClusterDownError, MasterDownError: a slot without a primary for now
    TryAgainError,  # a cluster slot being migrated
    RedisClusterException,  # no cluster node answers
)

# Keep `key -> value` in the hash `entries`, and only the newest `limit` keys (in `order`).
_REMEMBER = """
local function remember(entries, order, key, value, limit)
  if redis.call('HEXISTS', entries, key) == 0 then redis.call('RPUSH', order, key) end
  redis.call('HSET', entries, key, value)
  while redis.call('LLEN', order) > limit do
    redis.call('HDEL', entries, redis.call('LPOP', order))
  end
end
"""

# The done mark is written every time (a retry too), so that the WAIT after it covers the
# first write of the outcome even on another connection (likewise a session change always
# rewrites the record) (WAIT waits for the client's last
# write; a script that writes nothing would leave nothing to wait for).
_RECORD_OUTCOME = (
    _REMEMBER
    + """
redis.call('HDEL', KEYS[5], ARGV[6])
redis.call('HDEL', KEYS[6], ARGV[1])
local counted = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'EX', ARGV[4])
if counted == 1 then return 0 end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], 'reason:' .. ARGV[5], 1) end
redis.call('HINCRBY', KEYS[2], 'outcome:' .. ARGV[2], 1)
remember(KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

_RECORD_REJECTION = (
    _REMEMBER
    + """
redis.call('HINCRBY', KEYS[1], 'rejection:' .. ARGV[2], 1)
remember(KEYS[2], KEYS[3], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

# Open only what has no outcome yet (a late open must not reopen a decided request).
_OPEN_REQUEST = """
local key = ARGV[2]
if redis.call('HEXISTS', KEYS[3], key) == 1 or redis.call('HEXISTS', KEYS[4], key) == 1 then
  key = key .. '~' .. string.sub(ARGV[1], 1, 12)
  redis.call('HINCRBY', KEYS[5], 'repeated_request_ids', 1)
end
if redis.call('EXISTS', KEYS[1]) == 1 then return key end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({request_id = key, replica_id = ARGV[3]}))
redis.call('HSET', KEYS[4], key, ARGV[1])
return key
"""

_CLOSE_REQUEST = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[2], cjson.decode(raw)['request_id'])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# Compare-and-set a session: write only if the record is still the one the change was
# computed from (by SHA-1; '' for none), and keep the sorted set of new sessions in step.
_CHANGE_SESSION = """
local raw = redis.call('GET', KEYS[1])
local seen = ''
if raw then seen = redis.sha1hex(raw) end
if seen ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
end
return 1
"""

_REPORT_LOAD = """
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known and cjson.decode(known)['seq'] >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# Drop the load reports that are still expired (one written meanwhile is fresh: kept).
_DROP_EXPIRED = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if cjson.decode(fields[i + 1])['expires_at'] <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return 1
"""

# Drop the oldest sessions without history beyond the bound (never one that has history: it
# left the set when it got some). The session keys share the set's hash tag (one slot).
_TRIM_NEW = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
for _, sid in ipairs(oldest) do
  redis.call('DEL', ARGV[2] .. sid)
  redis.call('ZREM', KEYS[1], sid)
end
return excess
"""


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


def _shard(identifier: str, shards: int) -> int:
    return zlib.crc32(identifier.encode()) % shards if shards > 1 else 0


def _request_base(request_id: str) -> str:
    """The client's request id of a ledger key (`<id>~<suffix>` keeps the shard of `<id>`)."""
    return request_id.split("~", 1)[0]


class RedisStore(StateStore):
    def __init__(
        self,
        settings: StoreSettings,
        url: str,
        *,
        setting_name: str = "CHATSTREAM_REDIS_URL",
    ) -> None:
        if not url:
            raise ValueError(
                f"session_store=redis needs the Redis URL in the environment variable "
                f"{setting_name} (e.g. redis://:password@host:6379/0, "
                "redis+cluster://:password@host:6379, redis+sentinel://host:26379/mymaster)"
            )
        self.settings = settings
        self.setting_name = setting_name
        self.target: RedisTarget = parse_redis_url(url, setting_name)
        self._sentinel: Sentinel | None = None
        self._redis = self._client(self.target)
        self.shards = CLUSTER_SHARDS if self.target.mode == "cluster" else 1
        if self.target.mode == "cluster" and self.target.wait_replicas:
            raise ValueError(
                f"{setting_name}: wait_replicas is not supported with redis+cluster:// "
                "(remove it; see the README's state section for what a cluster failover can lose)"
            )
        ns = settings.namespace
        self._global = f"chatstream:{{{ns}}}:"
        self._session_prefix = [f"chatstream:{{{ns}|s{k}}}:" for k in range(self.shards)]
        self._ledger_prefix = [f"chatstream:{{{ns}|l{k}}}:" for k in range(self.shards)]
        self._legacy_prefix = f"chatstream:{ns}:"  # the layout before hash tags
        self._new_bound = max(1, -(-settings.max_new_sessions // self.shards))
        self._ledger_bound = max(1, -(-settings.ledger_size // self.shards))
        self._ttl_ms = int(settings.session_ttl_sec * 1000)
        self._record_outcome = self._redis.register_script(_RECORD_OUTCOME)
        self._record_rejection = self._redis.register_script(_RECORD_REJECTION)
        self._report_load = self._redis.register_script(_REPORT_LOAD)
        self._open_request = self._redis.register_script(_OPEN_REQUEST)
        self._close_request = self._redis.register_script(_CLOSE_REQUEST)
        self._change_session_script = self._redis.register_script(_CHANGE_SESSION)
        self._trim_new = self._redis.register_script(_TRIM_NEW)
        self._drop_expired = self._redis.register_script(_DROP_EXPIRED)
        self._key: str | None = None
        self._verified = False
        self._open_shards: dict[str, int] = {}  # record id -> ledger shard, of our opens
        self._init_lock = asyncio.Lock()
        self._warned_at = -1e9
        self._initialized = False
        self._key_state: RedisKeyState | None = None

    def _client(self, target: RedisTarget) -> Any:
        timeouts = {
            "socket_timeout": SOCKET_TIMEOUT_SEC,
            "socket_connect_timeout": SOCKET_TIMEOUT_SEC,
        }
        if target.mode == "standalone":
            return aioredis.Redis.from_url(
                target.url, health_check_interval=10, decode_responses=True, **timeouts
            )
        auth = {"username": target.username, "password": target.password}
        if target.mode == "cluster":
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                ssl=target.ssl,
                decode_responses=True,
                **auth,
                **timeouts,
            )
        sentinel_kwargs = {
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            "ssl": target.ssl,
            **timeouts,
        }
        self._sentinel = Sentinel(
            list(target.nodes), sentinel_kwargs=sentinel_kwargs, ssl=target.ssl, **timeouts
        )
        return self._sentinel.master_for(
            target.service,
            connection_class=_PrimarySSLConnection if target.ssl else _PrimaryConnection,
            db=target.db,
            decode_responses=True,
            health_check_interval=10,
            **auth,
        )

    # ------------------------------------------------------------------ keys
    def _k(self, name: str) -> str:
        return self._global + name

    def _session_keys(self, session_id: str) -> tuple[str, str, str]:
        """The session's record, its shard's set of new sessions, and the shard's prefix."""
        prefix = self._session_prefix[_shard(session_id, self.shards)]
        return prefix + "s:" + session_id, prefix + "new", prefix + "s:"

    def _ledger_shard(self, request_id: str) -> int:
        return _shard(_request_base(request_id), self.shards)

    def _l(self, shard: int, name: str) -> str:
        return self._ledger_prefix[shard] + name

    async def _ready(self) -> None:
        """A cluster client learns the slots once, before any concurrent use (redis-py's
        lazy initialization races when many first commands run at once)."""
        if self.target.mode != "cluster" or self._initialized:
            return
        async with self._init_lock:
            if not self._initialized:
                await self._redis.initialize()
                self._initialized = True

    async def _run(self, coro: Any) -> Any:
        try:
            await self._ready()
            return await coro
        except AskError as exc:  # MOVED or ASK reached us: a cluster behind a plain URL
            raise StoreUnavailable(
                f"Redis answered {exc!r}: it is a Redis Cluster; set {self.setting_name} "
                "to redis+cluster://host:port"
            ) from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc!r}") from exc

    async def _durable(self, what: str, script: Any, strict: bool = True, **call: Any) -> Any:
        """Run `script` (or, without one, `call["command"]`); with `wait_replicas`, also WAIT
        on the same connection until that many replicas have it. Fewer within the timeout:
        `strict`, StoreUnavailable (the write is on the primary; a retry rewrites and waits
        again); else a warning (a session stays usable while a replica is down)."""
        wait = self.target.wait_replicas
        if not wait:
            if script is None:
                return await self._run(self._redis.execute_command(*call["command"]))
            return await self._run(script(**call))
        async with self._redis.pipeline(transaction=False) as pipe:
            if script is None:
                pipe.execute_command(*call["command"])
            else:
                await script(**call, client=pipe)
            pipe.execute_command("WAIT", wait, self.target.wait_timeout_ms)
            result, acked = await self._run(pipe.execute())
        if acked < wait:
            message = (
                f"{what} written on the primary but confirmed by {acked} of {wait} replicas "
                f"within {self.target.wait_timeout_ms} ms"
            )
            if strict:
                raise StoreUnavailable(message)
            if time.monotonic() - self._warned_at > 10:
                self._warned_at = time.monotonic()
                logger.warning("%s: a failover now could lose it", message)
        return result

    # ------------------------------------------------------------------ start-up checks
    async def verify(self, wait_sec: float = VERIFY_WAIT_SEC) -> None:
        """Check once, at start, that the URL fits the server and that it takes writes.
        Waits up to `wait_sec` for a Redis that cannot be reached yet; raises
        `StoreMisconfigured` with one line that says what to set."""
        deadline = time.monotonic() + wait_sec
        while True:
            try:
                await self._verify_once()
                return
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise StoreMisconfigured(
                        f"{self.setting_name}: cannot reach Redis at {self.target.describe()} "
                        f"within {wait_sec:g} s ({exc.__cause__ or exc}); check the host, port "
                        "and that it runs"
                    ) from None
                await asyncio.sleep(0.5)

    def _refuse(self, what: str) -> StoreMisconfigured:
        return StoreMisconfigured(f"{self.setting_name}: {self.target.describe()} {what}")

    async def _verify_once(self) -> None:
        target = self.target
        try:
            await self._ready()
            if target.mode == "sentinel":
                await self._verify_sentinel()
            # A cluster client already refused a node without cluster mode; its INFO would be
            # one random node's (perhaps a replica's): only the write probe below applies.
            info = {} if target.mode == "cluster" else await self._info()
            if target.mode == "standalone" and str(info.get("cluster_enabled", "0")) == "1":
                raise self._refuse(
                    "is a Redis Cluster node: set it to redis+cluster://<host>:<port> (the same "
                    "credentials) so that the client follows the cluster's slots"
                )
            if info.get("role") == "slave":
                primary = f"{info.get('master_host')}:{info.get('master_port')}"
                raise self._refuse(
                    f"is a read-only replica (of {primary}): point it at the primary, or at the "
                    "sentinels with redis+sentinel://<sentinel>:26379/<service>"
                )
            # A write proves the rest (a replica that hides its role, an ACL that forbids it).
            await self._redis.set(self._k("probe"), str(time.time()), px=60_000)
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
            raise self._refuse(
                f"refused the credentials ({exc}): check the user and password"
            ) from None
        except ReadOnlyError:
            raise self._refuse(
                "is read-only (a replica): point it at the primary, or at the sentinels with "
                "redis+sentinel://<sentinel>:26379/<service>"
            ) from None
        except AskError:  # MOVED: INFO was not allowed, the write probe found the cluster
            raise self._refuse(
                "is a Redis Cluster node: set it to redis+cluster://<host>:<port> (the same "
                "credentials) so that the client follows the cluster's slots"
            ) from None
        except NoPermissionError as exc:
            raise self._refuse(
                f"does not let this user write ({exc}): grant it the keys chatstream:*"
            ) from None
        except RedisClusterException as exc:
            if "not enabled" in str(exc):
                raise self._refuse(
                    "is not a Redis Cluster (cluster mode is off): use redis://<host>:<port>, "
                    "or redis+sentinel://... for a primary with sentinels"
                ) from None
            raise StoreUnavailable(f"Redis Cluster is unreachable: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc!r}") from exc
        self._verified = True

    async def _info(self) -> dict[str, Any]:
        """INFO's cluster and replication sections; {} if this user may not run INFO (the
        write probe then decides)."""
        info: dict[str, Any] = {}
        for section in ("cluster", "replication"):
            try:
                found = await self._redis.info(section)
            except NoPermissionError:
                continue
            except ResponseError as exc:
                if "unknown command" in str(exc).lower() or "noperm" in str(exc).lower():
                    continue
                raise
            info.update(found)
        return info

    async def _verify_sentinel(self) -> None:
        assert self._sentinel is not None
        try:
            await self._sentinel.discover_master(self.target.service)
            return
        except MasterNotFoundError as exc:
            reached = []
            for sentinel in self._sentinel.sentinels:
                try:
                    reached.append(await sentinel.sentinel_masters())
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    continue
                except ResponseError as error:
                    raise self._refuse(f"answered {error} (is it a sentinel?)") from None
            if not reached:
                raise StoreUnavailable(f"no sentinel answers: {exc}") from exc
            known = sorted({name for masters in reached for name in masters})
            if self.target.service not in known:
                raise self._refuse(
                    f"has no service {self.target.service!r} (the sentinels monitor: "
                    f"{', '.join(known) or 'nothing'}): set the service name after the hosts"
                ) from None
            raise StoreUnavailable(f"the sentinels know no live primary: {exc}") from exc

    # ------------------------------------------------------------------ sessions
    async def load_session(self, session_id: str) -> Record | None:
        key = self._session_keys(session_id)[0]
        raw = await self._run(self._redis.getex(key, px=self._ttl_ms))
        return json.loads(raw) if raw else None

    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        return await self._run(self._change_session(session_id, change))

    async def _change_session(self, session_id: str, change: SessionChange) -> Record:
        key, new_set, session_prefix = self._session_keys(session_id)
        while True:
            raw = await self._redis.get(key)
            record = apply_change(json.loads(raw) if raw else None, change, self.settings.limits)
            seen = hashlib.sha1(raw.encode()).hexdigest() if raw else ""
            established = is_established(record)
            written = await self._durable(
                f"session {session_id}",
                self._change_session_script,
                strict=False,
                keys=[key, new_set],
                args=[
                    seen,
                    json.dumps(record),
                    self._ttl_ms,
                    "1" if established else "0",
                    session_id,
                    time.time(),
                ],
            )
            if written:
                break  # else someone changed it meanwhile: apply to the new record
        if not established:
            await self._trim_new(keys=[new_set], args=[self._new_bound, session_prefix])
        return record

    async def signing_key(self) -> str:
        if not self._verified:
            await self._verify_once()  # refuse a misfit URL even if the ingress did not ask
        if self.settings.signing_key:
            return self.settings.signing_key
        if self._key is None:
            key = self._k("key")
            found = await self._run(self._redis.get(key))
            if found is None:
                # Keep the key of the layout before hash tags: cookies stay valid.
                legacy = await self._run(self._redis.get(self._legacy_prefix + "key"))
                new_key = legacy or secrets.token_urlsafe(32)
                await self._durable(
                    "signing key", None, strict=False, command=("SET", key, new_key, "NX")
                )
                found = await self._run(self._redis.get(key))
            self._key = found
        return self._key

    # ------------------------------------------------------------------ accounting
    async def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        shard = self._ledger_shard(request_id)
        key = await self._run(
            self._open_request(
                keys=[
                    self._l(shard, "done:" + record_id),
                    self._l(shard, "open"),
                    self._l(shard, "ledger:o"),
                    self._l(shard, "open:keys"),
                    self._l(shard, "totals"),
                ],
                args=[record_id, request_id, replica_id],
            )
        )
        self._open_shards[record_id] = shard
        return key

    async def close_request(self, record_id: str) -> None:
        shard = self._open_shards.get(record_id)
        shards = [shard] if shard is not None else range(self.shards)
        for k in shards:
            await self._run(
                self._close_request(
                    keys=[self._l(k, "open"), self._l(k, "open:keys")], args=[record_id]
                )
            )
        self._open_shards.pop(record_id, None)

    async def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        Outcome(outcome)
        shard = self._ledger_shard(request_id)
        call = {
            "keys": [
                self._l(shard, "done:" + record_id),
                self._l(shard, "totals"),
                self._l(shard, "ledger:o"),
                self._l(shard, "ledger:order"),
                self._l(shard, "open"),
                self._l(shard, "open:keys"),
            ],
            "args": [
                request_id,
                outcome,
                self._ledger_bound,
                DONE_MARK_TTL_SEC,
                reason,
                record_id,
            ],
        }
        await self._durable(f"outcome of {request_id}", self._record_outcome, **call)
        self._open_shards.pop(record_id, None)

    def key_state(self) -> RedisKeyState:
        if self._key_state is None:
            self._key_state = RedisKeyState(self)
        return self._key_state

    @staticmethod
    def wall_clock() -> float:
        return time.time()

    async def live_replicas(self, grace_sec: float) -> set[str]:
        """Ingress replicas whose load report expired less than `grace_sec` ago."""
        reports = await self._run(self._redis.hgetall(self._k("load")))
        cutoff = time.time() - grace_sec
        return {k for k, v in reports.items() if json.loads(v)["expires_at"] > cutoff}

    async def sweep_lost_requests(self, grace_sec: float) -> int:
        open_requests: dict[str, str] = {}
        for found in await self._each_shard("hgetall", "open"):
            open_requests.update(found)
        if not open_requests:
            return 0
        live = await self.live_replicas(grace_sec)
        lost = 0
        for record_id, raw in open_requests.items():
            entry = json.loads(raw)
            if entry["replica_id"] not in live:
                await self.record_outcome(record_id, entry["request_id"], LOST_OUTCOME, LOST_REASON)
                lost += 1
        return lost

    async def record_rejection(self, request_id: str, reason: str) -> None:
        shard = self._ledger_shard(request_id)
        await self._run(
            self._record_rejection(
                keys=[
                    self._l(shard, "totals"),
                    self._l(shard, "ledger:r"),
                    self._l(shard, "ledger:rorder"),
                ],
                args=[request_id, reason, self._ledger_bound],
            )
        )

    async def _each_shard(self, command: str, name: str, *args: Any) -> list[Any]:
        """`command` on the ledger key `name` of every shard (one round trip per node)."""
        if self.shards == 1:
            return [await self._run(getattr(self._redis, command)(self._l(0, name), *args))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for k in range(self.shards):
                getattr(pipe, command)(self._l(k, name), *args)
            return await self._run(pipe.execute())

    async def outcome_totals(self) -> dict[str, Any]:
        raw: dict[str, int] = {}
        for shard_totals in await self._each_shard("hgetall", "totals"):
            for field, value in shard_totals.items():
                raw[field] = raw.get(field, 0) + int(value)
        outcomes = {o.value: raw.get("outcome:" + o.value, 0) for o in Outcome}
        rejections = {
            k.removeprefix("rejection:"): v for k, v in raw.items() if k.startswith("rejection:")
        }
        reasons = {k.removeprefix("reason:"): v for k, v in raw.items() if k.startswith("reason:")}
        return {
            "outcomes": outcomes,
            "rejections": rejections,
            "admitted": sum(outcomes.values()),
            "repeated_request_ids": raw.get("repeated_request_ids", 0),
            "unknown_error_reasons": reasons,
            "open": sum(await self._each_shard("hlen", "open")),
        }

    async def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        if not request_ids:
            outcomes: dict[str, str] = {}
            rejections: dict[str, str] = {}
            for found in await self._each_shard("hgetall", "ledger:o"):
                outcomes.update(found)
            for found in await self._each_shard("hgetall", "ledger:r"):
                rejections.update(found)
            return {"outcomes": outcomes, "rejections": rejections}
        by_shard: dict[int, list[str]] = {}
        for request_id in request_ids:
            by_shard.setdefault(self._ledger_shard(request_id), []).append(request_id)
        result: dict[str, dict[str, str]] = {"outcomes": {}, "rejections": {}}
        for shard, ids in by_shard.items():
            for field, name in (("outcomes", "ledger:o"), ("rejections", "ledger:r")):
                found = await self._run(self._redis.hmget(self._l(shard, name), ids))
                result[field].update({i: v for i, v in zip(ids, found, strict=True) if v})
        return {
            field: {i: entries[i] for i in request_ids if i in entries}
            for field, entries in result.items()
        }

    # ------------------------------------------------------------------ load board
    async def report_load(
        self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float
    ) -> None:
        report = {"seq": seq, "ongoing": ongoing, "queued": queued, "expires_at": expires_at}
        await self._run(
            self._report_load(keys=[self._k("load")], args=[replica_id, seq, json.dumps(report)])
        )

    async def load(self) -> dict[str, int]:
        raw = await self._run(self._redis.hgetall(self._k("load")))
        now = time.time()
        reports = {k: json.loads(v) for k, v in raw.items()}
        live = [r for r in reports.values() if r["expires_at"] > now]
        if len(live) < len(reports):
            await self._run(self._drop_expired(keys=[self._k("load")], args=[now]))
        return {
            "ongoing": sum(r["ongoing"] for r in live),
            "queued": sum(r["queued"] for r in live),
        }

    async def close(self) -> None:
        await self._redis.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
