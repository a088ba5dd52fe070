"""A weighted round-robin queue between tenants, in front of the model handle. Pure asyncio, on
one event loop (an ingress replica's).

* At most `capacity` places at the model are held at once (the model's slots). A request
  holds `places` of them: 1, or `n` for an OpenAI request with `n` choices (n generations at
  once). While its places are free and nobody waits, a request goes straight through.
* Otherwise it waits in its tenant's line. When a place frees, the next tenant in turn takes it:
  each tenant with someone waiting gets `weight` places per round (1 unless configured), so a
  request at the head of its tenant's line waits for at most one round of freed places: the
  sum of the other waiting tenants' weights (plus its own), whatever the others send. A
  request of several places spends that many of its tenant's round, and waits at the head until
  they are all free (later requests do not overtake it, so it cannot starve).
* The lines hold at most `max_waiting` requests in all (`max_queued_requests`; -1: no bound).
  A tenant's share of them is `max_waiting * weight / total weight` of the tenants waiting
  (itself included; at least 1). When the lines are full, a newcomer whose tenant is within
  its share takes the place of the newest request of the tenant furthest over its share (that
  one is refused: `over_fair_share`); a newcomer whose tenant is at or over its share is refused
  (`over_fair_share`); when every tenant is within its share, `queue_full`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

OVER_SHARE = "over_fair_share"
QUEUE_FULL = "too_many_requests"  # the whole queue is full: today's capacity refusal


class QueueRefused(Exception):
    """No place in the queue: `reason` is OVER_SHARE or QUEUE_FULL."""

    def __init__(self, tenant: str, reason: str) -> None:
        super().__init__(f"{tenant}: {reason}")
        self.tenant = tenant
        self.reason = reason


@dataclass(eq=False)
class Ticket:
    """One request's places: waiting, then holding `places` of the model's places until
    released."""

    queue: FairQueue
    tenant: str
    enqueued_at: float
    future: asyncio.Future | None = None
    places: int = 1
    admitted_at: float | None = None
    released: bool = False

    @property
    def waited_s(self) -> float:
        return (self.admitted_at or self.enqueued_at) - self.enqueued_at

    def release(self) -> None:
        """Give the place back (idempotent); a waiting request leaves the line."""
        self.queue._release(self)


class FairQueue:
    def __init__(
        self,
        capacity: int,
        max_waiting: int,
        weights: Mapping[str, int] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_waiting = max_waiting
        self.weights = dict(weights or {})
        self.clock = clock
        self.in_flight = 0
        self._running: dict[str, int] = {}
        self._lines: dict[str, deque[Ticket]] = {}  # dict order: the round-robin turn
        self._credit: dict[str, int] = {}  # places left to the tenant at the head this round

    def weight(self, tenant: str) -> int:
        return self.weights.get(tenant, 1)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def share(self, tenant: str, newcomer: str | None = None) -> int:
        """`tenant`'s share of the queue's places, among the tenants waiting, itself and the
        `newcomer`, if any."""
        if self.max_waiting < 0:
            return self.max_waiting
        tenants = set(self._lines) | {tenant} | ({newcomer} if newcomer else set())
        total = sum(self.weight(t) for t in tenants)
        return max(1, self.max_waiting * self.weight(tenant) // total)

    def _fits(self, ticket: Ticket) -> bool:
        # Never more than the whole capacity: a model scaled below a request's places must not
        # hold it (and everyone behind it) forever.
        return self.in_flight + min(ticket.places, self.capacity) <= self.capacity

    async def enter(self, tenant: str, places: int = 1) -> Ticket:
        """Wait for `places` places at the model. Raises QueueRefused; a cancelled wait leaves
        the line."""
        ticket = Ticket(self, tenant, self.clock(), places=places)
        if self._fits(ticket) and not self._lines:
            self._admit(ticket)
            return ticket
        self._make_room(tenant)
        ticket.future = asyncio.get_running_loop().create_future()
        self._lines.setdefault(tenant, deque()).append(ticket)
        try:
            await ticket.future
        except BaseException:
            ticket.release()  # leaves the line, or gives back a place granted meanwhile
            raise
        return ticket

    def _make_room(self, tenant: str) -> None:
        if self.max_waiting < 0 or self.waiting < self.max_waiting:
            return
        if len(self._lines.get(tenant, ())) >= self.share(tenant):
            raise QueueRefused(tenant, OVER_SHARE)
        victim = max(self._lines, key=lambda t: len(self._lines[t]) - self.share(t, tenant))
        if len(self._lines[victim]) <= self.share(victim, tenant):
            raise QueueRefused(tenant, QUEUE_FULL)
        newest = self._lines[victim][-1]
        self._leave(newest)
        newest.released = True
        # Its wait may be over already (its client left, its task not yet resumed): then it
        # is simply gone, and its place is the newcomer's.
        if not newest.future.done():
            newest.future.set_exception(QueueRefused(victim, OVER_SHARE))

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted_at = self.clock()
        self.in_flight += ticket.places
        self._running[ticket.tenant] = self._running.get(ticket.tenant, 0) + ticket.places

    def _leave(self, ticket: Ticket) -> None:
        line = self._lines.get(ticket.tenant)
        if line is not None and ticket in line:
            line.remove(ticket)
            if not line:
                del self._lines[ticket.tenant]
                self._credit.pop(ticket.tenant, None)

    def _release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket.admitted_at is None:
            self._leave(ticket)
            return
        self.in_flight -= ticket.places
        self._running[ticket.tenant] -= ticket.places
        if not self._running[ticket.tenant]:
            del self._running[ticket.tenant]
        self._dispatch()

    def resize(self, capacity: int) -> None:
        """The model's slots changed (replicas scaled outside the app's args): follow them."""
        self.capacity = max(1, capacity)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free places to the tenants in turn (weighted round robin)."""
        while self.in_flight < self.capacity and self._lines:
            tenant = next(iter(self._lines))
            line = self._lines[tenant]
            if line[0].future is not None and not line[0].future.done() and not self._fits(line[0]):
                return  # its places are not all free yet: it waits at the head
            ticket = line.popleft()
            credit = self._credit.get(tenant, self.weight(tenant)) - ticket.places
            if not line:
                del self._lines[tenant]
                self._credit.pop(tenant, None)
            elif credit <= 0:  # its turn is over: to the back of the round
                self._lines[tenant] = self._lines.pop(tenant)
                self._credit.pop(tenant, None)
            else:
                self._credit[tenant] = credit
            if ticket.future is None or ticket.future.done():
                ticket.released = True  # its wait was cancelled: not admitted
                continue
            self._admit(ticket)
            ticket.future.set_result(None)

    def snapshot(self) -> dict[str, Any]:
        """For `/load`: places taken and waiting, and each tenant's figures and share."""
        tenants = set(self._lines) | set(self._running)
        return {
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "max_waiting": self.max_waiting,
            "tenants": {
                t: {
                    "running": self._running.get(t, 0),
                    "waiting": len(self._lines.get(t, ())),
                    "weight": self.weight(t),
                    "queue_share": self.share(t),
                }
                for t in sorted(tenants)
            },
        }
