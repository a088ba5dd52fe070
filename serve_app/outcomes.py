"""The four outcomes of an admitted request, how one is decided, and the ledger that counts them."""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ray.exceptions import RayError, TaskCancelledError
from starlette.requests import ClientDisconnect


class Outcome(StrEnum):
    SUCCESS = "success"
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"


# An admitted request whose ingress replica died before deciding its outcome is closed by a
# surviving replica with this outcome and reason (its callback died with the replica).
LOST_OUTCOME = Outcome.UNKNOWN_ERROR_OCCURRED.value
LOST_REASON = "ingress_lost"


def is_client_disconnect(exc: BaseException | None) -> bool:
    """Whether `exc` is how a vanished client shows up in the ingress.

    Ray Serve cancels the handler's task (CancelledError); Starlette raises ClientDisconnect (an
    OSError subclass) when a send fails; a closed async generator sees GeneratorExit; a
    downstream Ray call cancelled with us raises TaskCancelledError (RequestCancelledError for a
    handle call); Starlette's disconnect listener can surface that too.
    """
    if exc is None:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return all(is_client_disconnect(e) for e in exc.exceptions)
    if isinstance(exc, TaskCancelledError):
        return True
    if isinstance(exc, RayError):  # a failure inside Ray (e.g. the engine raised), even if it
        return False  # also subclasses the cause's type, such as OSError
    if isinstance(exc, asyncio.CancelledError | GeneratorExit | OSError):
        return True
    return isinstance(exc, ClientDisconnect)


def classify_outcome(chunks_sent: int, completed: bool, exc: BaseException | None) -> Outcome:
    """Decide the outcome of an admitted request once its stream is over.

    `completed`: every chunk of the answer was handed to the client. `chunks_sent`: how many
    were. `exc`: what ended the stream early, if anything.
    """
    if completed:
        return Outcome.SUCCESS
    if is_client_disconnect(exc):
        if chunks_sent > 0:
            return Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
        return Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
    return Outcome.UNKNOWN_ERROR_OCCURRED


class OutcomeLedger:
    """Totals per outcome and per rejection reason, plus the newest `max_entries` request ids.

    Pure bookkeeping; the shared-state actor holds one for all ingress replicas.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        on_drop: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_drop(kind, key)` hears of each entry that leaves ("outcome" / "rejection" by
        request id, "record" by record id), for a store that mirrors the ledger elsewhere."""
        self.max_entries = max_entries
        self.outcome_totals: Counter[str] = Counter({o.value: 0 for o in Outcome})
        self.rejection_totals: Counter[str] = Counter()
        self.reason_totals: Counter[str] = Counter()  # why an unknown error was declared
        # Admitted requests whose outcome is not decided yet: record id -> (request id, replica)
        self.open: dict[str, tuple[str, str]] = {}
        self._open_keys: set[str] = set()
        self.entries: dict[str, OrderedDict[str, str | None]] = {
            "outcome": OrderedDict(),
            "rejection": OrderedDict(),
            "record": OrderedDict(),
        }
        self.repeated_request_ids = 0
        self._on_drop = on_drop or (lambda kind, key: None)

    def _remember(self, kind: str, key: str, value: str | None) -> None:
        entries = self.entries[kind]
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            self._on_drop(kind, entries.popitem(last=False)[0])

    def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        """An admitted request whose outcome `replica_id` will decide. Returns its key in the
        ledger: `request_id`, or, if another request already has that id (clients choose
        them), `request_id~<server id>`, so that no client overwrites another's entry."""
        key = request_id
        if request_id in self.entries["outcome"] or request_id in self._open_keys:
            key = f"{request_id}~{record_id[:12]}"
            self.repeated_request_ids += 1
        if record_id not in self.entries["record"]:
            self.open[record_id] = (key, replica_id)
            self._open_keys.add(key)
        return key

    def close_request(self, record_id: str) -> None:
        """Forget an open request that was not admitted after all (429)."""
        key, _ = self.open.pop(record_id, (None, None))
        self._open_keys.discard(key)

    def lost_requests(self, live_replicas: set[str]) -> list[tuple[str, str]]:
        """(record id, request id) of open requests whose replica is gone."""
        return [
            (rid, req) for rid, (req, replica) in self.open.items() if replica not in live_replicas
        ]

    def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        """Count `outcome` once per `record_id` (a retried write is not counted again)."""
        Outcome(outcome)  # refuse anything but the four outcomes
        self.close_request(record_id)
        if record_id in self.entries["record"]:
            return
        self._remember("record", record_id, None)
        if reason:
            self.reason_totals[reason] += 1
        self.outcome_totals[outcome] += 1
        self._remember("outcome", request_id, outcome)

    def record_rejection(self, request_id: str, reason: str) -> None:
        self.rejection_totals[reason] += 1
        self._remember("rejection", request_id, reason)

    def totals(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.outcome_totals),
            "rejections": dict(self.rejection_totals),
            "admitted": sum(self.outcome_totals.values()),
            "repeated_request_ids": self.repeated_request_ids,
            "unknown_error_reasons": dict(self.reason_totals),
            "open": len(self.open),
        }

    def restore_totals(self, totals: dict[str, Any]) -> None:
        """Take back totals saved from `totals()` (a restarted holder of the ledger)."""
        self.outcome_totals.update(totals["outcomes"])
        self.rejection_totals.update(totals["rejections"])
        self.reason_totals.update(totals.get("unknown_error_reasons", {}))
        self.repeated_request_ids = totals["repeated_request_ids"]

    def lookup(self, request_ids: list[str] | None = None) -> dict[str, dict[str, str]]:
        outcomes, rejections = self.entries["outcome"], self.entries["rejection"]
        if not request_ids:
            return {"outcomes": dict(outcomes), "rejections": dict(rejections)}
        return {
            "outcomes": {i: outcomes[i] for i in request_ids if i in outcomes},
            "rejections": {i: rejections[i] for i in request_ids if i in rejections},
        }
