"""The state of one load-test run: the options, what every client request observed (its tally),
the fault injection's result. One `RUN` per Locust process, reset at each test start; the users,
the fault injection and the final check all read and write it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loadtest.accounting import ClientRecord
from loadtest.options import STORE_FAULTS, Options

STORE_UNAVAILABLE = "store_unavailable"
TURN_IN_PROGRESS = "turn_in_progress"
OVER_FAIR_SHARE = "over_fair_share"  # a 429 of the fair queue (serve_app/fair_queue.py)
NOTHING_TO_REGENERATE = "nothing_to_regenerate"


@dataclass
class FaultResult:
    attempted: bool = False
    kind: str = ""
    killed: str = ""
    recovered: bool = False
    detail: str = ""
    started_at: float = 0.0  # wall clock: the injection began
    up_at: float = 0.0  # wall clock: the fault is over (0 while it lasts)
    state_lost: bool = False  # the state holder restarted empty (state-actor)
    first_id_after: int = -1  # request numbers from here on were sent after the fault


@dataclass
class RunState:
    """Everything the users observed in this run (reset at each test start)."""

    options: Options = field(default_factory=Options)
    prefix: str = ""
    records: list[ClientRecord] = field(default_factory=list)
    totals_before: dict[str, Any] = field(default_factory=dict)
    quitters_in_flight: int = 0
    quiet: bool = False  # quitters pause while the fault injector works
    fault: FaultResult = field(default_factory=FaultResult)
    warnings: list[str] = field(default_factory=list)
    unsupported: str = ""
    fault_greenlet: Any = None  # the gevent greenlet of the fault injection
    report: Any = None  # the AccountingReport, once the final check ran
    next_number: int = 0

    def reset(self, options: Options) -> None:
        """Forget the previous run (the web UI may start several in one process)."""
        self.__init__(options=options)  # type: ignore[misc]
        self.prefix = f"lt{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}"

    def new_id(self, kind: str) -> str:
        number, self.next_number = self.next_number, self.next_number + 1
        return f"{self.prefix}-{kind}-{number}"

    def record(self, request_id: str, behaviour: str, *accepts: str, violation: str = "") -> None:
        self.records.append(ClientRecord(request_id, behaviour, tuple(accepts), violation))

    @property
    def errors_expected(self) -> bool:
        """Engine errors (cut streams, 500s) are part of the scenario only when a model replica
        is killed. A store fault must show as 503 store_unavailable, never as a 500."""
        return self.options.fault_at > 0 and self.options.fault_kind == "replica"

    @property
    def store_fault(self) -> bool:
        """The state store goes away mid-run: 503 store_unavailable while it is down, and 409
        turn_in_progress while a turn's release waits for the store (retried in the background)."""
        return self.options.fault_at > 0 and self.options.fault_kind in STORE_FAULTS

    def overlaps_store_fault(self, started_at: float) -> bool:
        """A request sent at `started_at` (wall clock) and answered now met the store fault: the
        service may have refused it without being able to record the refusal."""
        if not self.store_fault or not self.fault.started_at:
            return False
        over = self.fault.up_at or float("inf")
        return started_at <= over + 1.0 and time.time() >= self.fault.started_at

    def refusal_codes(self, *codes: str) -> tuple[str, ...]:
        """The error codes a behaviour may meet: its own, and those a store fault brings. A
        full queue may also refuse a tenant that holds its share (the fair queue)."""
        if "too_many_requests" in codes:
            codes = (*codes, OVER_FAIR_SHARE)
        if not self.store_fault:
            return codes
        extra = (STORE_UNAVAILABLE, TURN_IN_PROGRESS)
        if self.options.fault_allow_state_loss:  # the history may be gone
            extra += (NOTHING_TO_REGENERATE,)
        return (*codes, *extra)


RUN = RunState()
