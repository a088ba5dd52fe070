"""The state store interface: sessions, the outcome ledger and totals, the load board, and
the cookie-signing key, behind one small async API with three backends (one module each):

- `memory`: one ingress replica's own state (tests);
- `ray`: an actor shared by the app's replicas; the embedded default, gone with the Ray cluster;
- `redis`: the production store, which survives restarts, upgrades and cluster replacement.

Every session change is atomic on the store's side (see `serve_app.session_state`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from serve_app.session_state import Record, SessionChange, SessionLimits


class StoreUnavailable(Exception):
    """The store cannot be reached now; new requests get 503 until it is back."""


class StoreMisconfigured(RuntimeError):
    """The store's settings do not fit what they point at (a Redis Cluster behind a plain URL,
    a read-only replica, an unknown Sentinel service, a Redis that cannot be reached at start).
    Raised at start by `StateStore.verify`; the message is one line that says what to set."""


@dataclass(frozen=True)
class StoreSettings:
    namespace: str  # the Serve application's name: one app's state never mixes with another's
    session_ttl_sec: float = 86400
    # Bounds: sessions with history (only a completed answer makes one), and sessions without
    # (a flood of new clients fills, and evicts, only these).
    max_sessions: int = 100_000
    max_new_sessions: int = 10_000
    limits: SessionLimits = field(default_factory=SessionLimits)
    ledger_size: int = 100_000
    signing_key: str = ""  # from the environment; empty: the store generates and keeps one


@dataclass(frozen=True)
class KeyRefusal:
    """Why a store refused a key's stream, with the state its Retry-After is computed from."""

    reason: str  # tokens_per_minute_exceeded or concurrency_limit_exceeded
    token_entries: list[tuple[float, int]] = field(default_factory=list)  # oldest first
    tokens_in_window: int = 0
    stream_starts: list[float] = field(default_factory=list)
    mean_stream_s: float | None = None


@dataclass(frozen=True)
class StreamAsk:
    """One request for a key's stream: who asks, when, and the key's limits (None: none)."""

    key_id: str
    lease_id: str
    replica_id: str
    now: float
    cap: int | None
    budget: int | None
    window_s: float


class KeyStateStore(abc.ABC):
    """Per-key limits and usage shared by every ingress replica (Redis only; the memory and ray
    stores leave them to each replica: `StateStore.key_state()` is None). Times are wall-clock
    seconds."""

    scope = "cluster"

    @abc.abstractmethod
    async def take_stream(self, ask: StreamAsk) -> KeyRefusal | None:
        """Atomically: refuse if the key's token window is at its budget or its running
        streams at the cap, else take a stream as `ask.lease_id`."""

    @abc.abstractmethod
    async def release_stream(self, key_id: str, lease_id: str, now: float) -> None:
        """Give a stream back (idempotent) and count its duration in the key's mean."""

    @abc.abstractmethod
    async def finished(
        self, key_id: str, outcome: str, prompt: int, completion: int, now: float, window_s: float
    ) -> None:
        """Count an outcome and its tokens (usage and the token window)."""

    @abc.abstractmethod
    async def rejected(self, key_id: str, reason: str) -> None: ...

    @abc.abstractmethod
    async def report(self, key_id: str, now: float, window_s: float) -> dict[str, Any]:
        """The key's usage figures and what it holds now (the `/v1/usage` shape)."""

    @abc.abstractmethod
    async def release_lost(self, key_ids: list[str], grace_sec: float) -> int:
        """Drop streams held by ingress replicas that are gone (see `sweep_lost_requests`)."""


class StateStore(abc.ABC):
    def key_state(self) -> KeyStateStore | None:
        """Per-key limits and usage shared by all replicas, or None: each replica keeps its own."""
        return None

    @abc.abstractmethod
    async def load_session(self, session_id: str) -> Record | None:
        """The session's record (its expiry restarts), or None if there is none."""

    @abc.abstractmethod
    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        """Apply `change` atomically to the stored record (a new one if there is none) and
        return the result. Raises what `apply_change` raises to refuse it."""

    @abc.abstractmethod
    async def signing_key(self) -> str:
        """The app's cookie-signing key: configured, or generated once and kept."""

    @abc.abstractmethod
    async def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        """Record an admitted request as open, its outcome to be decided by `replica_id`, and
        return its ledger key: `request_id`, or `request_id~<server id>` if that id is taken."""

    @abc.abstractmethod
    async def close_request(self, record_id: str) -> None:
        """Forget an open request that was refused after all (429): it gets no outcome."""

    @abc.abstractmethod
    async def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        """Count one outcome and close the request. Idempotent per `record_id`, so a retried
        write counts once. `reason`: why an unknown error was declared (e.g. ingress_lost)."""

    @abc.abstractmethod
    async def sweep_lost_requests(self, grace_sec: float) -> int:
        """Close, as `unknown_error_occurred` / `ingress_lost`, the open requests of ingress
        replicas whose load report expired more than `grace_sec` ago; return how many."""

    @abc.abstractmethod
    async def record_rejection(self, request_id: str, reason: str) -> None: ...

    @abc.abstractmethod
    async def outcome_totals(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]: ...

    @abc.abstractmethod
    async def report_load(
        self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float
    ) -> None:
        """One ingress replica's load (absolute figures). Reports older than the stored one
        (lower `seq`) are ignored; a report counts until `expires_at` (wall clock)."""

    @abc.abstractmethod
    async def load(self) -> dict[str, int]:
        """Requests waiting for a slot and holding one, summed over live ingress replicas."""

    async def verify(self) -> None:  # noqa: B027 - optional hook
        """Once, at start (before serving): check that the store's settings fit what they
        point at, waiting a few seconds for a store that is still starting. Raises
        `StoreMisconfigured` (one line saying what to set) instead of failing every request."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
