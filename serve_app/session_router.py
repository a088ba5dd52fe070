"""Session-affine routing: a session's turns go to the model replica that served the previous
one, where its KV prefix is kept (engines/prefix_cache.py), so a turn prefills only what it adds.

The replica is derived from the key alone, by rendezvous hashing over the live replicas: every
ingress replica, and an ingress that restarted, picks the same one with nothing stored. When a
replica goes (scale-down, drain, crash) only its own sessions move, each to its next choice in
the same hash order, so they again agree across ingresses. When the chosen replica is so busy
that the turn would get its first token sooner prefilling its whole history on the least loaded
other replica (`saturated`, measured bounds), it goes there instead (Serve probes the others'
queues and takes the shortest); a fallback only costs a full prefill, never an error.

`route` is the pure decision; `SessionAffinityRouter` is the thin adapter to Serve 2.60's
request-router API (`request_router_config` on the model deployment, builder.py).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

# Through the module, never a name of it: Serve ships this class to the processes that route
# with cloudpickle, by value, so a global of this module would be a copy per router.
from serve_app import metrics

# When a turn leaves its replica for the least loaded other one: when its replica's queue is at
# least SATURATION_QUEUE_LEN plus FALLBACK_COST_RATIO times the other's. Waiting costs the turn
# about a decode step per prefill chunk of its new tokens, and a step grows with the requests
# queued; going elsewhere costs a prefill of the whole history, each chunk of which also waits
# for a step there. Measured by benchmarks/bench_saturation.py (default engine, bfloat16, one
# torch thread per replica as 2 replicas on 2 cores; a ~1,200-token history, 185 new tokens):
# TTFT 0.73 s affine on an idle replica, +46 ms per queued request; a full prefill 4.6 s idle,
# +235 ms per request queued there. So the first bound is where 0.73 s + 46 ms x q passes
# 4.6 s (q = 85) and the ratio is 235 / 46. Both exceed what the default 32 slots
# (max_ongoing_requests) ever reach: with them a turn leaves only a full replica, which Serve
# itself passes over. They matter for replicas with more slots; re-measure there (the router's
# `saturation_queue_len` and `fallback_cost_ratio` kwargs).
SATURATION_QUEUE_LEN = 85
FALLBACK_COST_RATIO = 5.2
# How long a replica that left still counts as the one a session had (to report its sessions'
# moves as fallbacks of reason `replica_gone` rather than as affine choices).
REMEMBER_GONE_S = 600.0

_MAX_INTENDED = 10_000


@dataclass(frozen=True)
class Route:
    ranks: list[list[str]]  # replica ids, most preferred rank first
    preferred: str | None  # the replica the session is affine to (None: no key)
    reason: str  # why not `preferred` first: "saturated", "replica_gone"; "" when it is


def score(key: str, replica: str) -> int:
    """Rendezvous weight of `replica` for `key` (stable across processes, unlike `hash`)."""
    digest = hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_order(key: str, replicas: list[str]) -> list[str]:
    return sorted(replicas, key=lambda r: score(key, r), reverse=True)


def saturated(
    queue: int | None,
    others: list[int | None],
    saturation_queue_len: int = SATURATION_QUEUE_LEN,
    fallback_cost_ratio: float = FALLBACK_COST_RATIO,
) -> bool:
    """Whether a turn waits longer on its replica (`queue` requests there) than it would take
    to prefill its history on the least loaded of the `others` (an unknown queue counts as
    idle, as Serve probes a replica before it sends a request there)."""
    if queue is None or not others:
        return False
    lightest = min(0 if q is None else q for q in others)
    return queue >= saturation_queue_len + fallback_cost_ratio * lightest


def route(
    key: str | None,
    live: dict[str, int | None],
    gone: set[str] = frozenset(),
    saturation_queue_len: int = SATURATION_QUEUE_LEN,
    fallback_cost_ratio: float = FALLBACK_COST_RATIO,
) -> Route:
    """Where a request of session `key` goes, given the live replicas' queue lengths (None:
    unknown) and the replicas that left recently (`gone`)."""
    if not live:
        return Route([], None, "")
    if key is None:
        # No session to keep together: Serve's own power of two choices.
        return Route([random.sample(list(live), min(2, len(live)))], None, "")
    order = hash_order(key, list(live))
    preferred, rest = order[0], order[1:]
    reason = ""
    if gone and hash_order(key, [preferred, *gone])[0] != preferred:
        reason = "replica_gone"  # its own replica left; `preferred` is its stable next choice
    others = [live[r] for r in rest]
    if saturated(live[preferred], others, saturation_queue_len, fallback_cost_ratio):
        return Route([rest, [preferred]], preferred, "saturated")
    return Route([[preferred], rest] if rest else [[preferred]], preferred, reason)


def session_key(pending: PendingRequest | None) -> str | None:
    """The routing key of a model call: its `GenerationRequest.session`."""
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        session = getattr(arg, "session", None)
        if isinstance(session, str) and session:
            return session
    return None


def decision_of(decided: Route, replica: str) -> tuple[str, str]:
    """(decision, reason) of a request routed as `decided` that went to `replica`."""
    if replica != decided.preferred:
        # Not its replica: saturated, or passed over by Serve, which found it full
        # (max_ongoing_requests) or could not reach it.
        return "fallback", decided.reason or "full"
    if decided.reason == "replica_gone":
        return "fallback", "replica_gone"
    return "affine", ""


class SessionAffinityRouter(RequestRouter):
    """Serve's request router for the model deployment (one per ingress replica's handle).

    Not with Serve's `FIFOMixin`: it hands a chosen replica to the oldest waiting request,
    whatever its session; the base class gives it to the request it was chosen for.
    """

    def initialize_state(
        self,
        saturation_queue_len: int = SATURATION_QUEUE_LEN,
        fallback_cost_ratio: float = FALLBACK_COST_RATIO,
    ) -> None:
        self.saturation_queue_len = saturation_queue_len
        self.fallback_cost_ratio = fallback_cost_ratio
        self._seen: dict[str, float] = {}  # replica id -> when it was last live
        # internal request id -> its route, until routed (bounded: a request cancelled while
        # waiting is never routed).
        self._intended: OrderedDict[str, Route] = OrderedDict()

    def _gone(self, live: list[str]) -> set[str]:
        now = time.monotonic()
        for replica in live:
            self._seen[replica] = now
        for replica, seen in list(self._seen.items()):
            if now - seen > REMEMBER_GONE_S:
                del self._seen[replica]
        return set(self._seen) - set(live)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        live = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        decided = route(
            session_key(pending_request),
            live,
            self._gone(list(by_id)),
            self.saturation_queue_len,
            self.fallback_cost_ratio,
        )
        if pending_request is not None and decided.preferred is not None:
            self._intended[pending_request.metadata.internal_request_id] = decided
            while len(self._intended) > _MAX_INTENDED:
                self._intended.popitem(last=False)
        return [[by_id[rid] for rid in rank] for rank in decided.ranks]

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        """Serve's own choice, then the decision it amounts to is recorded. (Serve's public
        `on_request_routed` hook fires only under its strict rejection protocol.)"""
        replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        decided = self._intended.pop(pending_request.metadata.internal_request_id, None)
        if decided is not None:
            metrics.count_routing(*decision_of(decided, replica.replica_id.unique_id))
        return replica

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._seen.setdefault(replica_id.unique_id, time.monotonic())
