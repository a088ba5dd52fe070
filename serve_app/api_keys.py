"""API keys: loading, hashed lookup, per-key limits and per-key usage. Pure logic, no Ray.

Design note
-----------
* Keys reach the app only through the environment (a Secret in a cluster):
  `CHATSTREAM_API_KEYS` holds lines `key_id:key`; or `CHATSTREAM_API_KEYS_FILE` names a file of
  such lines. Blank lines and `#` comments are skipped; the key is everything after the first
  colon. Neither set means keys are off (`load_api_keys` returns None: the local `serve run`).
  Set but holding no key, or both set, is a configuration error (fail closed, never open).
* Only SHA-256 digests are kept. A lookup hashes the presented bearer token and compares it with
  every digest using `hmac.compare_digest` (no early exit), and yields the key's id. Key ids,
  never keys or digests, go to logs, metrics and errors; `repr` shows ids only.
* `KeyQuotas` enforces per-key limits with an injected clock (`time.monotonic` by default):
  - concurrent streams: a lease is taken at admission (before ChatStream's own admission, so
    a key at its limit never queues for, nor takes, another key's slot) and released once
    when the request is over, whatever its outcome;
  - tokens per minute: tokens are accounted after the fact (`account`) into a 60 s sliding
    window; a key whose window has reached its budget is refused until enough entries age out.
  A refusal is `QuotaExceeded` with `retry_after_s` computed from when the limit frees: for
  tokens, when the oldest entries leave the window; for streams, the key's mean stream
  duration (moving average of what it has seen) minus the age of its oldest running stream.
  `KeyQuotas` holds the state in this ingress replica (the memory and ray stores); with Redis
  the state is the store's, shared by every replica (serve_app/shared_quotas.py), and the
  decisions are the same pure functions (`tokens_free_in`, `stream_frees_in`).
* `KeyUsage` counts, per key id: admitted requests by outcome, refusals by reason, prompt and
  completion tokens; `snapshot()` is the admin JSON and the source for Prometheus counters
  labelled by key id.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.config import API_KEYS_ENV, API_KEYS_FILE_ENV

ANONYMOUS_KEY_ID = "anonymous"  # usage bucket for requests when keys are off
TOKEN_WINDOW_S = 60.0
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_KEY_CHARS = 8

Clock = Callable[[], float]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyError(ValueError):
    """The API key configuration is malformed (raised at startup; names no key)."""


class ApiKeyRing:
    """The configured keys, as (key id, SHA-256 digest) pairs."""

    def __init__(self, entries: Mapping[str, bytes]) -> None:
        if not entries:
            raise ApiKeyError("no API keys configured")
        self._entries = tuple(entries.items())

    @classmethod
    def from_lines(cls, text: str, source: str = API_KEYS_ENV) -> ApiKeyRing:
        """Parse `key_id:key` lines. Errors name the line number and key id, never the key."""
        entries: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, key = line.partition(":")
            key_id, key = key_id.strip(), key.strip()
            if not sep or not _KEY_ID_RE.match(key_id):
                raise ApiKeyError(
                    f"{source} line {number}: expected 'key_id:key' with a key id of 1-64 "
                    "letters, digits, '.', '_' or '-'"
                )
            if len(key) < MIN_KEY_CHARS:
                raise ApiKeyError(
                    f"{source} line {number}: the key of '{key_id}' is shorter than "
                    f"{MIN_KEY_CHARS} characters"
                )
            if key_id in entries:
                raise ApiKeyError(f"{source} line {number}: key id '{key_id}' appears twice")
            digest = _digest(key)
            if digest in entries.values():
                raise ApiKeyError(f"{source} line {number}: '{key_id}' repeats another id's key")
            entries[key_id] = digest
        if not entries:
            raise ApiKeyError(f"{source} holds no API key")
        return cls(entries)

    @property
    def key_ids(self) -> list[str]:
        return [key_id for key_id, _ in self._entries]

    def lookup(self, key: str) -> str | None:
        """The id of `key`, or None. Compares against every digest (no early exit)."""
        presented = _digest(key)
        found = None
        for key_id, digest in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = key_id
        return found

    def authenticate(self, authorization: str | None) -> str | None:
        """The key id for an `Authorization: Bearer <key>` header value, or None."""
        key = bearer_token(authorization)
        return self.lookup(key) if key else None

    def __repr__(self) -> str:
        return f"ApiKeyRing(key_ids={self.key_ids!r})"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def load_api_keys(environ: Mapping[str, str] | None = None) -> ApiKeyRing | None:
    """Keys from `CHATSTREAM_API_KEYS` or the file named by `CHATSTREAM_API_KEYS_FILE`; None
    when neither is set (keys off). Raises `ApiKeyError` for a bad configuration."""
    environ = os.environ if environ is None else environ
    inline, path = environ.get(API_KEYS_ENV), environ.get(API_KEYS_FILE_ENV)
    if inline is not None and path is not None:
        raise ApiKeyError(f"set only one of {API_KEYS_ENV} and {API_KEYS_FILE_ENV}")
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ApiKeyError(f"{API_KEYS_FILE_ENV}: cannot read {path} ({exc.strerror})") from None
        return ApiKeyRing.from_lines(text, f"{API_KEYS_FILE_ENV} ({path})")
    if inline is not None:
        return ApiKeyRing.from_lines(inline, API_KEYS_ENV)
    return None


# ---------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class KeyLimits:
    """Limits of one key; None means unlimited."""

    max_concurrent_streams: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent_streams", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be a positive integer or None")


class QuotaExceeded(Exception):
    """A key is over one of its limits. `reason` is `concurrency_limit_exceeded` or
    `tokens_per_minute_exceeded`; `retry_after_s` when the limit is expected to free."""

    def __init__(self, key_id: str, reason: str, retry_after_s: float, message: str) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.message = message


# Weight of the newest stream in the moving average of stream durations.
DURATION_SMOOTHING = 0.2
# Floor and default of a stream-limit Retry-After (no history yet, or overdue streams).
MIN_RETRY_AFTER_S = 0.05
DEFAULT_STREAM_RETRY_AFTER_S = 1.0


# The arithmetic of the limits, one definition for every store: the state is held in this
# process (`KeyQuotas`) or in Redis (serve_app/stores/redis_quotas.py), the decisions are these.
def tokens_free_in(
    entries: Iterable[tuple[float, int]], in_window: int, budget: int, now: float, window_s: float
) -> float:
    """Seconds until a window holding `entries` (oldest first, `in_window` tokens in all) drops
    below `budget`: entries only age out."""
    excess = in_window - budget + 1
    for stamp, tokens in entries:
        excess -= tokens
        if excess <= 0:
            return max(MIN_RETRY_AFTER_S, stamp + window_s - now)
    return window_s  # not reached when the entries sum to in_window


def stream_frees_in(mean_stream_s: float | None, oldest_start: float, now: float) -> float:
    """When one of a key's running streams is expected to end: its mean stream duration minus
    the age of its oldest running stream (a default without history)."""
    if mean_stream_s is None:
        return DEFAULT_STREAM_RETRY_AFTER_S
    return max(MIN_RETRY_AFTER_S, mean_stream_s - (now - oldest_start))


def smoothed_mean(previous: float | None, duration: float) -> float:
    """The moving average of stream durations after one more stream of `duration`."""
    if previous is None:
        return duration
    return previous + DURATION_SMOOTHING * (duration - previous)


_REFUSALS = {
    "tokens_per_minute_exceeded": "API key '{key_id}' used its {limit} tokens per minute",
    "concurrency_limit_exceeded": "API key '{key_id}' already has {limit} streams running",
}


def over_limit(key_id: str, reason: str, limit: int, retry_after_s: float) -> QuotaExceeded:
    """The refusal of a key over its `reason` limit (`limit` tokens or streams)."""
    message = _REFUSALS[reason].format(key_id=key_id, limit=limit)
    return QuotaExceeded(key_id, reason, retry_after_s, message)


@dataclass(eq=False)
class QuotaLease:
    """One admitted request's hold on its key's stream limit. `release()` is idempotent."""

    quotas: Any  # whoever holds the state: KeyQuotas, or the shared quotas of a store
    key_id: str
    started_at: float
    released: bool = False
    lease_id: str = ""

    def release(self) -> None:
        self.quotas._release(self)


@dataclass
class _KeyState:
    running: list[QuotaLease] = field(default_factory=list)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    tokens_in_window: int = 0
    mean_stream_s: float | None = None


class KeyQuotas:
    """Per-key concurrent-stream and tokens-per-minute limits (one ingress replica's view).

    Thread-safe (a lock around each call) so finalizers and worker threads may release."""

    def __init__(
        self,
        default: KeyLimits = KeyLimits(),
        per_key: Mapping[str, KeyLimits] | None = None,
        *,
        clock: Clock = time.monotonic,
        window_s: float = TOKEN_WINDOW_S,
    ) -> None:
        self.default = default
        self.per_key = dict(per_key or {})
        self.clock = clock
        self.window_s = window_s
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def limits(self, key_id: str) -> KeyLimits:
        return self.per_key.get(key_id, self.default)

    def _state(self, key_id: str) -> _KeyState:
        return self._keys.setdefault(key_id, _KeyState())

    def _expire(self, state: _KeyState, now: float) -> None:
        while state.tokens and state.tokens[0][0] <= now - self.window_s:
            state.tokens_in_window -= state.tokens.popleft()[1]

    def admit(self, key_id: str) -> QuotaLease:
        """Take a stream of `key_id`'s, or raise `QuotaExceeded` with a computed Retry-After."""
        limits = self.limits(key_id)
        with self._lock:
            now = self.clock()
            state = self._state(key_id)
            self._expire(state, now)
            budget = limits.tokens_per_minute
            if budget is not None and state.tokens_in_window >= budget:
                raise over_limit(
                    key_id,
                    "tokens_per_minute_exceeded",
                    budget,
                    self._tokens_free_in(state, budget, now),
                )
            cap = limits.max_concurrent_streams
            if cap is not None and len(state.running) >= cap:
                raise over_limit(
                    key_id, "concurrency_limit_exceeded", cap, self._stream_frees_in(state, now)
                )
            lease = QuotaLease(self, key_id, now)
            state.running.append(lease)
            return lease

    def _tokens_free_in(self, state: _KeyState, budget: int, now: float) -> float:
        return tokens_free_in(state.tokens, state.tokens_in_window, budget, now, self.window_s)

    def _stream_frees_in(self, state: _KeyState, now: float) -> float:
        oldest = min(lease.started_at for lease in state.running)
        return stream_frees_in(state.mean_stream_s, oldest, now)

    def _release(self, lease: QuotaLease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            state = self._state(lease.key_id)
            state.running.remove(lease)
            duration = max(0.0, self.clock() - lease.started_at)
            state.mean_stream_s = smoothed_mean(state.mean_stream_s, duration)

    def account(self, key_id: str, tokens: int) -> None:
        """Charge `tokens` (prompt or completion) to `key_id`'s tokens-per-minute window."""
        if tokens <= 0:
            return
        with self._lock:
            now = self.clock()
            state = self._state(key_id)
            state.tokens.append((now, tokens))
            state.tokens_in_window += tokens
            self._expire(state, now)

    def snapshot(self, key_id: str) -> dict[str, Any]:
        """What `key_id` holds now: running streams and tokens in the window."""
        with self._lock:
            state = self._state(key_id)
            self._expire(state, self.clock())
            limits = self.limits(key_id)
            return {
                "running_streams": len(state.running),
                "tokens_in_window": state.tokens_in_window,
                "max_concurrent_streams": limits.max_concurrent_streams,
                "tokens_per_minute": limits.tokens_per_minute,
            }


# ---------------------------------------------------------------------------------- usage
@dataclass
class _Usage:
    outcomes: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class KeyUsage:
    """Per-key usage counters: admitted requests by outcome, refusals by reason, tokens."""

    def __init__(self) -> None:
        self._keys: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def record_outcome(
        self, key_id: str, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        with self._lock:
            usage = self._keys.setdefault(key_id, _Usage())
            usage.outcomes[outcome] += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens

    def record_rejection(self, key_id: str, reason: str) -> None:
        with self._lock:
            self._keys.setdefault(key_id, _Usage()).rejections[reason] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """`{key_id: {"requests": {outcome: n}, "rejections": {reason: n}, "prompt_tokens",
        "completion_tokens", "total_tokens"}}`."""
        with self._lock:
            return {
                key_id: {
                    "requests": dict(usage.outcomes),
                    "rejections": dict(usage.rejections),
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                }
                for key_id, usage in self._keys.items()
            }
