"""`session_store=redis`: the production store (Redis 7 or Valkey, through redis-py's asyncio
client). It survives restarts of Serve and Ray, upgrades and Ray cluster replacement.

Keys, all under `chatstream:{app}:`:
    s:<session id>   the session record as JSON, expiring `session_ttl_sec` after last use
    new              sorted set of sessions without history, by last change (bounded)
    key              the generated cookie-signing key (when none is configured)
    totals           hash of outcome, rejection and unknown-error reason counts
    open             hash of admitted requests without an outcome yet, by record id
    open:keys        their ledger keys (a request id in use gets a server suffix)
    ledger:o / ledger:r / ledger:order   newest request ids and their outcome / rejection
    done:<record id> marks a counted outcome, so a retried write counts once
    load             hash of each ingress replica's load report (JSON)

Session changes are optimistic transactions: WATCH the record, apply the pure change from
`session_state` to what is stored, and write it in MULTI; if anyone wrote meanwhile, Redis
aborts and we start again from the new record. The ledger and load board use Lua scripts.
Connection failures become `StoreUnavailable`; commands time out rather than hang.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON, Outcome
from serve_app.session_state import Record, SessionChange, apply_change, is_established
from serve_app.stores.base import StateStore, StoreSettings, StoreUnavailable

# A stuck Redis must not hold a request for long: fail, answer 503, let the client retry.
SOCKET_TIMEOUT_SEC = 2.0
DONE_MARK_TTL_SEC = 24 * 3600

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

_RECORD_OUTCOME = (
    _REMEMBER
    + """
redis.call('HDEL', KEYS[5], ARGV[6])
redis.call('HDEL', KEYS[6], ARGV[1])
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) == false then return 0 end
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
# left the set when it got some).
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


class RedisStore(StateStore):
    def __init__(self, settings: StoreSettings, url: str) -> None:
        if not url:
            raise ValueError(
                "session_store=redis needs the Redis URL in the environment variable "
                "CHATSTREAM_REDIS_URL (e.g. redis://:password@host:6379/0)"
            )
        self.settings = settings
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SEC,
            socket_connect_timeout=SOCKET_TIMEOUT_SEC,
            health_check_interval=10,
            decode_responses=True,
        )
        self._prefix = f"chatstream:{settings.namespace}:"
        self._ttl_ms = int(settings.session_ttl_sec * 1000)
        self._record_outcome = self._redis.register_script(_RECORD_OUTCOME)
        self._record_rejection = self._redis.register_script(_RECORD_REJECTION)
        self._report_load = self._redis.register_script(_REPORT_LOAD)
        self._open_request = self._redis.register_script(_OPEN_REQUEST)
        self._trim_new = self._redis.register_script(_TRIM_NEW)
        self._drop_expired = self._redis.register_script(_DROP_EXPIRED)
        self._key: str | None = None

    def _k(self, name: str) -> str:
        return self._prefix + name

    async def _run(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc

    # ------------------------------------------------------------------ sessions
    async def load_session(self, session_id: str) -> Record | None:
        raw = await self._run(self._redis.getex(self._k("s:" + session_id), px=self._ttl_ms))
        return json.loads(raw) if raw else None

    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        return await self._run(self._change_session(session_id, change))

    async def _change_session(self, session_id: str, change: SessionChange) -> Record:
        key = self._k("s:" + session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    record = apply_change(
                        json.loads(raw) if raw else None, change, self.settings.limits
                    )
                    pipe.multi()
                    pipe.set(key, json.dumps(record), px=self._ttl_ms)
                    if is_established(record):
                        pipe.zrem(self._k("new"), session_id)
                    else:
                        pipe.zadd(self._k("new"), {session_id: time.time()})
                    await pipe.execute()
                    break
                except WatchError:
                    continue  # someone changed it meanwhile: apply to the new record
        if not is_established(record):
            await self._trim_new(
                keys=[self._k("new")], args=[self.settings.max_new_sessions, self._k("s:")]
            )
        return record

    async def signing_key(self) -> str:
        if self.settings.signing_key:
            return self.settings.signing_key
        if self._key is None:
            key = self._k("key")
            await self._run(self._redis.set(key, secrets.token_urlsafe(32), nx=True))
            self._key = await self._run(self._redis.get(key))
        return self._key

    # ------------------------------------------------------------------ accounting
    async def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        return await self._run(
            self._open_request(
                keys=[
                    self._k("done:" + record_id),
                    self._k("open"),
                    self._k("ledger:o"),
                    self._k("open:keys"),
                    self._k("totals"),
                ],
                args=[record_id, request_id, replica_id],
            )
        )

    async def close_request(self, record_id: str) -> None:
        raw = await self._run(self._redis.hget(self._k("open"), record_id))
        if raw:
            await self._run(self._redis.hdel(self._k("open:keys"), json.loads(raw)["request_id"]))
        await self._run(self._redis.hdel(self._k("open"), record_id))

    async def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        Outcome(outcome)
        await self._run(
            self._record_outcome(
                keys=[
                    self._k("done:" + record_id),
                    self._k("totals"),
                    self._k("ledger:o"),
                    self._k("ledger:order"),
                    self._k("open"),
                    self._k("open:keys"),
                ],
                args=[
                    request_id,
                    outcome,
                    self.settings.ledger_size,
                    DONE_MARK_TTL_SEC,
                    reason,
                    record_id,
                ],
            )
        )

    async def sweep_lost_requests(self, grace_sec: float) -> int:
        open_requests = await self._run(self._redis.hgetall(self._k("open")))
        if not open_requests:
            return 0
        reports = await self._run(self._redis.hgetall(self._k("load")))
        cutoff = time.time() - grace_sec
        live = {k for k, v in reports.items() if json.loads(v)["expires_at"] > cutoff}
        lost = 0
        for record_id, raw in open_requests.items():
            entry = json.loads(raw)
            if entry["replica_id"] not in live:
                await self.record_outcome(record_id, entry["request_id"], LOST_OUTCOME, LOST_REASON)
                lost += 1
        return lost

    async def record_rejection(self, request_id: str, reason: str) -> None:
        await self._run(
            self._record_rejection(
                keys=[self._k("totals"), self._k("ledger:r"), self._k("ledger:rorder")],
                args=[request_id, reason, self.settings.ledger_size],
            )
        )

    async def outcome_totals(self) -> dict[str, Any]:
        raw = await self._run(self._redis.hgetall(self._k("totals")))
        outcomes = {o.value: int(raw.get("outcome:" + o.value, 0)) for o in Outcome}
        rejections = {
            k.removeprefix("rejection:"): int(v)
            for k, v in raw.items()
            if k.startswith("rejection:")
        }
        reasons = {
            k.removeprefix("reason:"): int(v) for k, v in raw.items() if k.startswith("reason:")
        }
        return {
            "outcomes": outcomes,
            "rejections": rejections,
            "admitted": sum(outcomes.values()),
            "repeated_request_ids": int(raw.get("repeated_request_ids", 0)),
            "unknown_error_reasons": reasons,
            "open": await self._run(self._redis.hlen(self._k("open"))),
        }

    async def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        if not request_ids:
            outcomes = await self._run(self._redis.hgetall(self._k("ledger:o")))
            rejections = await self._run(self._redis.hgetall(self._k("ledger:r")))
            return {"outcomes": outcomes, "rejections": rejections}
        found_o = await self._run(self._redis.hmget(self._k("ledger:o"), request_ids))
        found_r = await self._run(self._redis.hmget(self._k("ledger:r"), request_ids))
        return {
            "outcomes": {i: v for i, v in zip(request_ids, found_o, strict=True) if v},
            "rejections": {i: v for i, v in zip(request_ids, found_r, strict=True) if v},
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
