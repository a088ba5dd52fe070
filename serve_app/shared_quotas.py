"""Per-key limits and usage that hold across every ingress replica, kept in the state store
(`StateStore.key_state()`: Redis). The same surface as `api_keys.KeyQuotas`, whose pure
functions decide every Retry-After; the store takes and gives back streams atomically.

A lease is taken before a request is admitted (one script: no two replicas take a key's last
stream) and given back, once, when the request is over: the release is queued on the replica's
event loop (it may be called from any thread) and retried while the store is down. The leases
of a replica that died are dropped by a survivor's lost-request sweep (serve_app/liveness.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from serve_app.api_keys import (
    TOKEN_WINDOW_S,
    KeyLimits,
    QuotaLease,
    over_limit,
    stream_frees_in,
    tokens_free_in,
)
from serve_app.background import Background
from serve_app.stores import StoreUnavailable
from serve_app.stores.base import KeyStateStore, StreamAsk

logger = logging.getLogger("ray.serve")

# A release or a usage count that failed because the store was down is retried this long.
RETRY_WINDOW_SEC = 300.0


@dataclass
class SharedKeyQuotas:
    """One ingress replica's door to the per-key state in the store."""

    state: KeyStateStore
    limits: Callable[[str], KeyLimits]  # a key id's limits
    replica_id: str
    background: Background
    clock: Callable[[], float] = time.time
    window_s: float = TOKEN_WINDOW_S

    async def admit(self, key_id: str) -> QuotaLease:
        """Take a stream of `key_id`'s (cluster-wide), or raise `QuotaExceeded` with a computed
        Retry-After. Raises StoreUnavailable when the store is down."""
        limits = self.limits(key_id)
        now = self.clock()
        lease = QuotaLease(self, key_id, now, lease_id=uuid.uuid4().hex)
        ask = StreamAsk(
            key_id,
            lease.lease_id,
            self.replica_id,
            now,
            limits.max_concurrent_streams,
            limits.tokens_per_minute,
            self.window_s,
        )
        try:
            refusal = await self.state.take_stream(ask)
        except BaseException:  # cancelled or failed: the take may have landed, give it back
            self._release(lease)
            raise
        if refusal is None:
            return lease
        if refusal.reason == "tokens_per_minute_exceeded":
            limit = limits.tokens_per_minute or 0
            retry = tokens_free_in(
                refusal.token_entries, refusal.tokens_in_window, limit, now, self.window_s
            )
        else:
            limit = limits.max_concurrent_streams or 0
            oldest = min(refusal.stream_starts, default=now)
            retry = stream_frees_in(refusal.mean_stream_s, oldest, now)
        raise over_limit(key_id, refusal.reason, limit, retry)

    def _release(self, lease: QuotaLease) -> None:
        """Give the stream back (idempotent; from any thread)."""
        if lease.released:
            return
        lease.released = True
        now = self.clock()
        self._later("release", lambda: self.state.release_stream(lease.key_id, lease.lease_id, now))

    def finished(self, key_id: str, outcome: str, prompt: int, completion: int) -> None:
        now = self.clock()
        self._later(
            "usage",
            lambda: self.state.finished(key_id, outcome, prompt, completion, now, self.window_s),
        )

    def rejected(self, key_id: str, reason: str) -> None:
        self._later("rejection", lambda: self.state.rejected(key_id, reason))

    async def report(self, key_id: str) -> dict[str, Any]:
        figures = await self.state.report(key_id, self.clock(), self.window_s)
        limits = self.limits(key_id)
        figures["now"]["max_concurrent_streams"] = limits.max_concurrent_streams
        figures["now"]["tokens_per_minute"] = limits.tokens_per_minute
        return figures

    async def release_lost(self, key_ids: list[str], grace_sec: float) -> int:
        return await self.state.release_lost(key_ids, grace_sec)

    def _later(self, what: str, write: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `write` on the replica's loop, retried while the store is down."""

        def spawn() -> None:
            self.background.spawn(self._retry(what, write))

        if self.background.on_loop_thread():
            spawn()
        else:
            self.background.call_soon(spawn)

    async def _retry(self, what: str, write: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        deadline = time.monotonic() + RETRY_WINDOW_SEC
        delay = 0.5
        while True:
            try:
                await write()
                return
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    logger.error("gave up writing an API key's %s to the store: %r", what, exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
