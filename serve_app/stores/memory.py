"""The in-process state: `MemoryState` holds it (used by the memory store and inside the Ray
actor), `MemoryStore` serves one ingress replica from it (`session_store=memory`)."""

from __future__ import annotations

import copy
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON, OutcomeLedger
from serve_app.session_state import Record, SessionChange, apply_change, is_established
from serve_app.stores.base import StateStore, StoreSettings


class SessionTable:
    """Session records with a sliding time-to-live and two size bounds.

    Sessions with history and sessions without are kept apart, each least-recently-used first
    out. A new session only gets history from a completed answer, so a flood of new clients
    evicts other new clients, never an established conversation."""

    def __init__(
        self,
        ttl_sec: float,
        max_sessions: int = 100_000,
        max_new_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        """`on_drop(session_id)` hears of each session evicted or expired."""
        self.ttl_sec = ttl_sec
        self._bounds = {True: max_sessions, False: max_new_sessions}
        self._clock = clock
        self._on_drop = on_drop or (lambda session_id: None)
        self._segments: dict[bool, OrderedDict[str, tuple[float, Record]]] = {
            True: OrderedDict(),
            False: OrderedDict(),
        }

    def _find(self, session_id: str) -> tuple[bool, Record] | None:
        for established, segment in self._segments.items():
            entry = segment.get(session_id)
            if entry is None:
                continue
            if self._clock() - entry[0] > self.ttl_sec:
                del segment[session_id]
                self._on_drop(session_id)
                return None
            return established, entry[1]
        return None

    def get(self, session_id: str) -> Record | None:
        found = self._find(session_id)
        if found is None:
            return None
        self.put(session_id, found[1])  # sliding expiry
        return found[1]

    def put(self, session_id: str, record: Record) -> None:
        for segment in self._segments.values():
            segment.pop(session_id, None)
        established = is_established(record)
        segment = self._segments[established]
        segment[session_id] = (self._clock(), record)
        while len(segment) > self._bounds[established]:
            self._on_drop(segment.popitem(last=False)[0])

    def __len__(self) -> int:
        return sum(len(s) for s in self._segments.values())


class LoadTable:
    """Each ingress replica's latest load report; stale and expired reports do not count."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[int, int, int, float]] = {}

    def report(self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float):
        known = self._reports.get(replica_id)
        if known is None or seq > known[0]:
            self._reports[replica_id] = (seq, ongoing, queued, expires_at)

    def live_replicas(self, now: float) -> set[str]:
        return {k for k, r in self._reports.items() if r[3] > now}

    def totals(self, now: float) -> dict[str, int]:
        live = [r for r in self._reports.values() if r[3] > now]
        self._reports = {k: r for k, r in self._reports.items() if r[3] > now}
        return {"ongoing": sum(r[1] for r in live), "queued": sum(r[2] for r in live)}


class MemoryState:
    """All of one app's state in one process. Methods are synchronous: callers serialize them
    (the Ray actor's single thread, or the event loop of one replica)."""

    def __init__(
        self,
        settings: StoreSettings,
        on_session_drop: Callable[[str], None] | None = None,
        on_ledger_drop: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = SessionTable(
            settings.session_ttl_sec,
            settings.max_sessions,
            settings.max_new_sessions,
            on_drop=on_session_drop,
        )
        self.ledger = OutcomeLedger(settings.ledger_size, on_drop=on_ledger_drop)
        self.load_table = LoadTable()
        self.key = settings.signing_key or secrets.token_urlsafe(32)

    def change_session(self, session_id: str, change: SessionChange) -> Record:
        record = apply_change(self.sessions.get(session_id), change, self.settings.limits)
        self.sessions.put(session_id, record)
        return record

    def lost_requests(self, grace_sec: float) -> list[tuple[str, str]]:
        return self.ledger.lost_requests(self.load_table.live_replicas(time.time() - grace_sec))


class MemoryStore(StateStore):
    """One replica's own state (`session_store=memory`): nothing is shared or kept."""

    def __init__(self, settings: StoreSettings) -> None:
        self._state = MemoryState(settings)

    async def load_session(self, session_id: str) -> Record | None:
        # A copy, as the other stores give: changing it must not change the store.
        return copy.deepcopy(self._state.sessions.get(session_id))

    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        return copy.deepcopy(self._state.change_session(session_id, change))

    async def signing_key(self) -> str:
        return self._state.key

    async def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        return self._state.ledger.open_request(record_id, request_id, replica_id)

    async def close_request(self, record_id: str) -> None:
        self._state.ledger.close_request(record_id)

    async def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        self._state.ledger.record_outcome(record_id, request_id, outcome, reason)

    async def sweep_lost_requests(self, grace_sec: float) -> int:
        lost = self._state.lost_requests(grace_sec)
        for record_id, request_id in lost:
            await self.record_outcome(record_id, request_id, LOST_OUTCOME, LOST_REASON)
        return len(lost)

    async def record_rejection(self, request_id: str, reason: str) -> None:
        self._state.ledger.record_rejection(request_id, reason)

    async def outcome_totals(self) -> dict[str, Any]:
        return self._state.ledger.totals()

    async def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        return self._state.ledger.lookup(request_ids)

    async def report_load(
        self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float
    ) -> None:
        self._state.load_table.report(replica_id, seq, ongoing, queued, expires_at)

    async def load(self) -> dict[str, int]:
        return self._state.load_table.totals(time.time())
