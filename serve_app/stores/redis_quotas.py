"""Per-key limits and usage held in Redis: one view for every ingress replica.

Keys (each key id's keys share one hash tag, so every script touches one slot of a cluster):

    chatstream:{<app>|k:<key id>}:streams   hash: lease id -> "<started at> <replica id>"
    chatstream:{<app>|k:<key id>}:tokens    list of "<time>:<tokens>", oldest first (the
                                            tokens-per-minute window; expires after a window)
    chatstream:{<app>|k:<key id>}:meta      hash: tokens (in the window), mean (stream seconds)
    chatstream:{<app>|k:<key id>}:usage     hash: outcome:<o>, rejection:<r>, prompt_tokens,
                                            completion_tokens (cumulative, cluster-wide)

Taking a stream is one script: age the token window, compare it with the budget, compare the
running streams with the cap, and take a lease, or return the state that the refusal's
Retry-After is computed from (by `serve_app.api_keys`' pure functions, the one definition of that
arithmetic). Two replicas cannot both take the last stream: Redis runs one script at a time.
Times are the replicas' wall clocks (`time.time()`).

A replica that dies holds its leases until the lost-request sweep (serve_app/liveness.py) of a
survivor drops them: leases of replicas whose load report expired, once older than the grace.
"""

from __future__ import annotations

from typing import Any

from serve_app.api_keys import DURATION_SMOOTHING
from serve_app.stores.base import KeyRefusal, KeyStateStore, StreamAsk

# Age the token window: drop entries at or before ARGV[cutoff]; keep meta.tokens in step.
_EXPIRE = """
local function expire(list, meta, cutoff)
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head then return end
    local sep = string.find(head, ':', 1, true)
    if tonumber(string.sub(head, 1, sep - 1)) > cutoff then return end
    redis.call('LPOP', list)
    redis.call('HINCRBY', meta, 'tokens', -tonumber(string.sub(head, sep + 1)))
  end
end
"""

# KEYS: streams, tokens, meta. ARGV: lease id, replica id, now, window, cap, budget (0: none).
_TAKE = (
    _EXPIRE
    + """
local now = tonumber(ARGV[3])
expire(KEYS[2], KEYS[3], now - tonumber(ARGV[4]))
local budget = tonumber(ARGV[6])
local used = tonumber(redis.call('HGET', KEYS[3], 'tokens') or '0')
if budget > 0 and used >= budget then
  return {'tokens_per_minute_exceeded', redis.call('LRANGE', KEYS[2], 0, -1), tostring(used)}
end
local cap = tonumber(ARGV[5])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then
  return {'concurrency_limit_exceeded', redis.call('HVALS', KEYS[1]),
          redis.call('HGET', KEYS[3], 'mean') or ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ' ' .. ARGV[2])
return {'ok'}
"""
)

# KEYS: streams, meta. ARGV: lease id, now, smoothing. The moving average of stream durations
# (`api_keys.smoothed_mean`) is updated here, in the same step as the release, so that none is
# lost between replicas.
_RELEASE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local started = tonumber(string.match(raw, '^(%S+)'))
local duration = math.max(0, tonumber(ARGV[2]) - started)
local mean = redis.call('HGET', KEYS[2], 'mean')
if mean then duration = tonumber(mean) + tonumber(ARGV[3]) * (duration - tonumber(mean)) end
redis.call('HSET', KEYS[2], 'mean', tostring(duration))
return 1
"""

# KEYS: tokens, meta, usage. ARGV: outcome, prompt, completion, now, window.
_FINISHED = (
    _EXPIRE
    + """
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[3], 'outcome:' .. ARGV[1], 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', prompt)
redis.call('HINCRBY', KEYS[3], 'completion_tokens', completion)
if prompt + completion > 0 then
  redis.call('RPUSH', KEYS[1], ARGV[4] .. ':' .. (prompt + completion))
  redis.call('HINCRBY', KEYS[2], 'tokens', prompt + completion)
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5]) * 2000))
end
expire(KEYS[1], KEYS[2], tonumber(ARGV[4]) - tonumber(ARGV[5]))
return 1
"""
)

# KEYS: streams, tokens, meta. ARGV: now, window. What the key holds now.
_NOW = (
    _EXPIRE
    + """
expire(KEYS[2], KEYS[3], tonumber(ARGV[1]) - tonumber(ARGV[2]))
return {redis.call('HLEN', KEYS[1]), tonumber(redis.call('HGET', KEYS[3], 'tokens') or '0')}
"""
)

# KEYS: streams. ARGV: cutoff (started at or before), live replica ids... Drop the leases of
# replicas that are not live.
_RELEASE_LOST = """
local live = {}
for i = 2, #ARGV do live[ARGV[i]] = true end
local entries = redis.call('HGETALL', KEYS[1])
local dropped = 0
for i = 1, #entries, 2 do
  local started, replica = string.match(entries[i + 1], '^(%S+) (.*)$')
  if not live[replica] and tonumber(started) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], entries[i])
    dropped = dropped + 1
  end
end
return dropped
"""


class RedisKeyState(KeyStateStore):
    """The per-key state of a `RedisStore` (its client, its error handling)."""

    scope = "cluster"

    def __init__(self, store: Any) -> None:
        self._store = store
        self._prefix = f"chatstream:{{{store.settings.namespace}|k:"
        redis = store._redis
        self._take = redis.register_script(_TAKE)
        self._release = redis.register_script(_RELEASE)
        self._finished = redis.register_script(_FINISHED)
        self._now = redis.register_script(_NOW)
        self._release_lost = redis.register_script(_RELEASE_LOST)

    def _keys(self, key_id: str, *names: str) -> list[str]:
        return [f"{self._prefix}{key_id}}}:{name}" for name in names]

    async def take_stream(self, ask: StreamAsk) -> KeyRefusal | None:
        found = await self._store._run(
            self._take(
                keys=self._keys(ask.key_id, "streams", "tokens", "meta"),
                args=[ask.lease_id, ask.replica_id, repr(ask.now), ask.window_s, ask.cap or 0,
                      ask.budget or 0],
            )
        )  # fmt: skip
        if found[0] == "ok":
            return None
        if found[0] == "tokens_per_minute_exceeded":
            entries = []
            for entry in found[1]:
                stamp, _, tokens = entry.partition(":")
                entries.append((float(stamp), int(tokens)))
            return KeyRefusal(found[0], token_entries=entries, tokens_in_window=int(found[2]))
        starts = [float(value.split(" ", 1)[0]) for value in found[1]]
        mean = float(found[2]) if found[2] else None
        return KeyRefusal(found[0], stream_starts=starts, mean_stream_s=mean)

    async def release_stream(self, key_id: str, lease_id: str, now: float) -> None:
        await self._store._run(
            self._release(
                keys=self._keys(key_id, "streams", "meta"),
                args=[lease_id, repr(now), DURATION_SMOOTHING],
            )
        )

    async def finished(
        self, key_id: str, outcome: str, prompt: int, completion: int, now: float, window_s: float
    ) -> None:
        await self._store._run(
            self._finished(
                keys=self._keys(key_id, "tokens", "meta", "usage"),
                args=[outcome, prompt, completion, repr(now), window_s],
            )
        )

    async def rejected(self, key_id: str, reason: str) -> None:
        usage = self._keys(key_id, "usage")[0]
        await self._store._run(self._store._redis.hincrby(usage, "rejection:" + reason, 1))

    async def report(self, key_id: str, now: float, window_s: float) -> dict[str, Any]:
        keys = self._keys(key_id, "streams", "tokens", "meta", "usage")
        running, in_window = await self._store._run(
            self._now(keys=keys[:3], args=[repr(now), window_s])
        )
        raw = await self._store._run(self._store._redis.hgetall(keys[3]))
        return usage_figures(raw, running, in_window)

    async def release_lost(self, key_ids: list[str], grace_sec: float) -> int:
        live = await self._store.live_replicas(grace_sec)
        cutoff = self._store.wall_clock() - grace_sec
        dropped = 0
        for key_id in key_ids:
            dropped += await self._store._run(
                self._release_lost(
                    keys=self._keys(key_id, "streams"), args=[repr(cutoff), *sorted(live)]
                )
            )
        return dropped


def usage_figures(raw: dict[str, str], running: int, in_window: int) -> dict[str, Any]:
    """The `/v1/usage` figures of one key from its usage hash."""
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {
        "requests": {k[8:]: int(v) for k, v in raw.items() if k.startswith("outcome:")},
        "rejections": {k[10:]: int(v) for k, v in raw.items() if k.startswith("rejection:")},
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "now": {"running_streams": int(running), "tokens_in_window": int(in_window)},
    }
