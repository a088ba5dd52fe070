"""The load board and the heartbeat of one ingress replica.

The load board reports what this replica holds (requests waiting for a slot, or holding one)
to the store, which sums every replica's figures for `/load`. The heartbeat re-sends them (the
replica's sign of life) and closes the open requests of replicas that show none: their
ingress died before deciding an outcome (the lost-request sweep).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ray import serve

from serve_app.background import Background
from serve_app.config import MODEL_DEPLOYMENT_NAME
from serve_app.outcomes import LOST_OUTCOME, LOST_REASON
from serve_app.stores import StateStore

logger = logging.getLogger("ray.serve")

# Each ingress replica re-sends its load this often; a report counts for three intervals, so
# the figures of a replica that died leave /load within that time.
LOAD_REPORT_INTERVAL_SEC = 5.0
# A replica whose report expired this long ago is gone: its open requests are closed.
LOST_GRACE_SEC = 3 * LOAD_REPORT_INTERVAL_SEC


class LoadBoard:
    """This ingress replica's admitted requests: waiting for a slot, or holding one.

    Changed only on the event loop's thread. Each change is reported to the store as absolute
    figures with a sequence number (a late report never overwrites a newer one) and an expiry
    (a dead replica's figures drop out)."""

    def __init__(self, store: StateStore, replica_id: str, background: Background) -> None:
        self._store = store
        self._replica_id = replica_id
        self._background = background
        self._seq = 0
        self.queued = 0
        self.ongoing = 0

    def change(self, queued: int = 0, ongoing: int = 0) -> None:
        self.queued += queued
        self.ongoing += ongoing
        self._background.spawn(self.report())

    async def report(self) -> bool:
        """Send the current figures; False if the store could not take them."""
        self._seq += 1
        expires_at = time.time() + 3 * LOAD_REPORT_INTERVAL_SEC
        try:
            await self._store.report_load(
                self._replica_id, self._seq, self.ongoing, self.queued, expires_at
            )
        except Exception:  # store down: the heartbeat sends it again
            return False
        return True


# How often the fair queue's capacity is matched to the model replicas Serve runs.
CAPACITY_POLL_SEC = 1.0


async def follow_model_slots(
    resize: Callable[[int], None], app_name: str, slots_per_replica: int
) -> None:
    """Keep the fair queue's capacity at the slots of the model replicas running now: the
    operator, `kubectl scale` and autoscaling change replicas outside the app's args."""
    while True:
        try:
            status = await asyncio.to_thread(serve.status)  # a blocking controller call
            app = status.applications.get(app_name)
            model = app.deployments.get(MODEL_DEPLOYMENT_NAME) if app else None
            running = int(model.replica_states.get("RUNNING", 0)) if model else 0
            if running:
                resize(running * slots_per_replica)
        except Exception as exc:  # the controller is busy or restarting: keep the last size
            logger.debug("could not read the model's replicas: %r", exc)
        await asyncio.sleep(CAPACITY_POLL_SEC)


async def heartbeat(
    board: LoadBoard,
    store: StateStore,
    count_lost: Callable[[int], None],
    release_lost: Callable[[float], Awaitable[int]] | None = None,
) -> None:
    """Re-send the board, and sweep lost requests, forever. The sweep runs only after two
    reports in a row went through, so that after a store outage every live replica has spoken
    before any is taken for dead. `release_lost(grace)` drops the API key streams that dead
    replicas held (shared per-key limits)."""
    reports_in_a_row = 0
    while True:
        await asyncio.sleep(LOAD_REPORT_INTERVAL_SEC)
        reports_in_a_row = reports_in_a_row + 1 if await board.report() else 0
        if reports_in_a_row < 2:
            continue
        try:
            if release_lost is not None and (freed := await release_lost(LOST_GRACE_SEC)):
                logger.error("released %d API key streams of ingress replicas that died", freed)
        except Exception as exc:
            logger.warning("could not release API key streams of lost replicas: %r", exc)
        try:
            lost = await store.sweep_lost_requests(LOST_GRACE_SEC)
        except Exception as exc:
            logger.warning("could not look for requests of lost ingress replicas: %r", exc)
            continue
        if lost:
            count_lost(lost)
            logger.error(
                "closed %d requests of an ingress replica that died as %s (%s)",
                lost,
                LOST_OUTCOME,
                LOST_REASON,
            )
