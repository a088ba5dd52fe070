"""`session_store=redis`: the production store (Redis 7 or Valkey, through redis-py's asyncio
client). It survives restarts of Serve and Ray, upgrades and Ray cluster replacement.

Three shapes of Redis, chosen by the URL (see `redis_url`): one server (`redis://`), a Redis
Cluster (`redis+cluster://`, redis-py's cluster client, which follows MOVED/ASK) and a primary
behind Sentinel (`redis+sentinel://`, the client asks the sentinels for the current primary).

Keys carry hash tags, so that each script touches one slot of a cluster (redis_keys.py).

Session changes are compare-and-set: read the record, apply the pure change from
`session_state`, and write it with a script that checks the record is still the one read (by
its SHA-1); if anyone wrote meanwhile, start again from the new record. The ledger and load
board use Lua scripts (redis_scripts.py). Connection failures, failovers (a primary that
turned replica, a cluster slot without a primary) become `StoreUnavailable`; commands time out
rather than hang. Where
`wait_replicas` is set (by default behind Sentinel), an outcome counts as written only once
that many replicas have it (`WAIT`), so a failover cannot lose it; session changes and the
generated signing key WAIT too, but a shortfall (a replica down) only logs a warning, so that
conversations go on; rejection counts, open-request marks and load reports do not wait.

`verify()` refuses, at start, a URL that does not fit the server (redis_checks.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from typing import Any

from redis.exceptions import AskError

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON, Outcome
from serve_app.session_state import Record, SessionChange, apply_change, is_established
from serve_app.stores import redis_checks, redis_scripts
from serve_app.stores.base import StateStore, StoreSettings, StoreUnavailable
from serve_app.stores.redis_client import UNAVAILABLE, make_client
from serve_app.stores.redis_keys import CLUSTER_SHARDS, RedisKeys
from serve_app.stores.redis_quotas import RedisKeyState
from serve_app.stores.redis_url import RedisTarget, parse_redis_url

logger = logging.getLogger("ray.serve")

DONE_MARK_TTL_SEC = 24 * 3600


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
        self._redis, self._sentinel = make_client(self.target)
        self.shards = CLUSTER_SHARDS if self.target.mode == "cluster" else 1
        self.keys = RedisKeys(settings.namespace, self.shards)
        # The key names, as the methods below use them.
        self._k, self._l = self.keys.global_key, self.keys.ledger_key
        self._session_keys, self._ledger_shard = self.keys.session, self.keys.ledger_shard
        if self.target.mode == "cluster" and self.target.wait_replicas:
            raise ValueError(
                f"{setting_name}: wait_replicas is not supported with redis+cluster:// "
                "(remove it; see the README's state section for what a cluster failover can lose)"
            )
        self._new_bound = max(1, -(-settings.max_new_sessions // self.shards))
        self._ledger_bound = max(1, -(-settings.ledger_size // self.shards))
        self._ttl_ms = int(settings.session_ttl_sec * 1000)
        self._record_outcome = self._redis.register_script(redis_scripts.RECORD_OUTCOME)
        self._record_rejection = self._redis.register_script(redis_scripts.RECORD_REJECTION)
        self._report_load = self._redis.register_script(redis_scripts.REPORT_LOAD)
        self._open_request = self._redis.register_script(redis_scripts.OPEN_REQUEST)
        self._close_request = self._redis.register_script(redis_scripts.CLOSE_REQUEST)
        self._change_session_script = self._redis.register_script(redis_scripts.CHANGE_SESSION)
        self._trim_new = self._redis.register_script(redis_scripts.TRIM_NEW)
        self._drop_expired = self._redis.register_script(redis_scripts.DROP_EXPIRED)
        self._key: str | None = None
        self._verified = False
        self._open_shards: dict[str, int] = {}  # record id -> ledger shard, of our opens
        self._init_lock = asyncio.Lock()
        self._warned_at = -1e9
        self._initialized = False
        self._key_state: RedisKeyState | None = None

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
        except UNAVAILABLE as exc:
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
    def _checks(self) -> redis_checks.Redis:
        return redis_checks.Redis(
            self._redis, self._sentinel, self.target, self.setting_name, self._k("probe"),
            self._ready,
        )  # fmt: skip

    async def verify(self, wait_sec: float = redis_checks.VERIFY_WAIT_SEC) -> None:
        """Check once, at start, that the URL fits the server and that it takes writes,
        waiting up to `wait_sec` for a Redis that is still starting (redis_checks.py)."""
        await redis_checks.verify(self._checks(), wait_sec)
        self._verified = True

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
            # Refuse a misfit URL even if the ingress did not ask (no waiting here).
            await redis_checks.check_once(self._checks())
            self._verified = True
        if self.settings.signing_key:
            return self.settings.signing_key
        if self._key is None:
            key = self._k("key")
            found = await self._run(self._redis.get(key))
            if found is None:
                # Keep the key of the layout before hash tags: cookies stay valid.
                legacy = await self._run(self._redis.get(self.keys.legacy_prefix + "key"))
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
