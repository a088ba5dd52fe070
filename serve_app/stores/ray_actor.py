"""`session_store=ray`: the app's state in one Ray actor shared by every ingress replica.

The actor's single thread applies each change to the current record, so changes are atomic.
Each change is also written through to Ray's GCS key-value store, and a restarted actor (a
`ray.kill`, a node loss) reads it all back: sessions, the ledger, the totals and the generated
cookie-signing key survive the actor. They do not survive the Ray cluster (a new `serve run`,
a new RayService cluster without GCS fault tolerance): that is what the Redis store is for.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.experimental import internal_kv

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON
from serve_app.session_state import Record, SessionChange
from serve_app.stores.base import StateStore, StoreSettings, StoreUnavailable
from serve_app.stores.memory import MemoryState

STATE_NAMESPACE = "chatstream"
# A call that takes longer is treated as the store being unavailable (nothing hangs).
ACTOR_CALL_TIMEOUT_SEC = 10.0


class GcsJournal:
    """The state's keys in Ray's GCS key-value store, one namespace per app."""

    def __init__(self, app: str) -> None:
        self._namespace = f"chatstream-{app}"

    def put(self, key: str, value: Any, overwrite: bool = True) -> None:
        internal_kv._internal_kv_put(
            key, json.dumps(value), overwrite=overwrite, namespace=self._namespace
        )

    def get(self, key: str) -> Any:
        raw = internal_kv._internal_kv_get(key, namespace=self._namespace)
        return None if raw is None else json.loads(raw)

    def delete(self, key: str) -> None:
        internal_kv._internal_kv_del(key, namespace=self._namespace)

    def items(self, prefix: str) -> list[tuple[str, Any]]:
        keys = internal_kv._internal_kv_list(prefix, namespace=self._namespace)
        return [(k.decode()[len(prefix) :], self.get(k.decode())) for k in keys]


@ray.remote(num_cpus=0, max_restarts=-1)
class SharedState:
    def __init__(self, settings: StoreSettings) -> None:
        self._journal = GcsJournal(settings.namespace)
        self._state = MemoryState(
            settings,
            on_session_drop=lambda session_id: self._journal.delete("s/" + session_id),
            on_ledger_drop=lambda kind, key: self._journal.delete(f"{kind}/{key}"),
        )
        if not settings.signing_key:
            # First writer wins; a restarted actor reads the same key back.
            self._journal.put("signing-key", self._state.key, overwrite=False)
            self._state.key = self._journal.get("signing-key")
        self._restore()

    def _restore(self) -> None:
        """Read back what an earlier incarnation of this actor wrote (nothing on first start)."""
        for session_id, record in self._journal.items("s/"):
            self._state.sessions.put(session_id, record)
        ledger = self._state.ledger
        if totals := self._journal.get("totals"):
            ledger.restore_totals(totals)
        for kind in ledger.entries:
            for key, value in self._journal.items(kind + "/"):
                ledger.entries[kind][key] = value
        for record_id, (key, replica_id) in self._journal.items("open/"):
            ledger.open[record_id] = (key, replica_id)
            ledger._open_keys.add(key)

    def load_session(self, session_id: str) -> Record | None:
        return self._state.sessions.get(session_id)

    def change_session(self, session_id: str, change: SessionChange) -> Record | Exception:
        try:
            record = self._state.change_session(session_id, change)
        except Exception as refused:  # returned, not raised: Ray would wrap it in RayTaskError
            return refused
        self._journal.put("s/" + session_id, record)
        return record

    def signing_key(self) -> str:
        return self._state.key

    def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        ledger = self._state.ledger
        key = ledger.open_request(record_id, request_id, replica_id)
        if record_id in ledger.open:
            self._journal.put("open/" + record_id, [key, replica_id])
        return key

    def close_request(self, record_id: str) -> None:
        self._state.ledger.close_request(record_id)
        self._journal.delete("open/" + record_id)

    def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        ledger = self._state.ledger
        if record_id in ledger.entries["record"]:
            return  # a retried write
        ledger.record_outcome(record_id, request_id, outcome, reason)
        self._journal.delete("open/" + record_id)
        self._journal.put("record/" + record_id, None)
        self._journal.put("outcome/" + request_id, outcome)
        self._journal.put("totals", ledger.totals())

    def record_rejection(self, request_id: str, reason: str) -> None:
        self._state.ledger.record_rejection(request_id, reason)
        self._journal.put("rejection/" + request_id, reason)
        self._journal.put("totals", self._state.ledger.totals())

    def sweep_lost_requests(self, grace_sec: float) -> int:
        lost = self._state.lost_requests(grace_sec)
        for record_id, request_id in lost:
            self.record_outcome(record_id, request_id, LOST_OUTCOME, LOST_REASON)
        return len(lost)

    def outcome_totals(self) -> dict[str, Any]:
        return self._state.ledger.totals()

    def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        return self._state.ledger.lookup(request_ids)

    def report_load(
        self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float
    ) -> None:
        self._state.load_table.report(replica_id, seq, ongoing, queued, expires_at)

    def load(self) -> dict[str, int]:
        return self._state.load_table.totals(time.time())


class RayStore(StateStore):
    """Calls the app's `SharedState` actor, created by whichever replica asks first.

    Detached, so that it outlives a redeploy of the app's replicas. Every call is submitted
    from a fresh, empty context: inside a Serve request Ray treats an actor call as a child of
    the request, and when Serve cancels the request (client gone) calls not yet sent are
    cancelled too; the actor then stalls (up to 30 s) on the missing sequence number. Our
    bookkeeping must outlive the request it describes.
    """

    def __init__(self, settings: StoreSettings) -> None:
        self._actor = SharedState.options(
            name=f"chatstream-state-{settings.namespace}",
            namespace=STATE_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        ).remote(settings)

    async def _call(self, method: str, *args: Any) -> Any:
        ref = contextvars.Context().run(getattr(self._actor, method).remote, *args)
        try:
            return await asyncio.wait_for(ref, ACTOR_CALL_TIMEOUT_SEC)
        except (RayActorError, ActorUnavailableError, TimeoutError) as exc:
            # Restarting (a kill, a node loss) or stuck: like an unreachable Redis, a 503.
            raise StoreUnavailable(f"the shared-state actor is unavailable: {exc!r}") from exc

    async def load_session(self, session_id: str) -> Record | None:
        return await self._call("load_session", session_id)

    async def change_session(self, session_id: str, change: SessionChange) -> Record:
        result = await self._call("change_session", session_id, change)
        if isinstance(result, Exception):
            raise result
        return result

    async def signing_key(self) -> str:
        return await self._call("signing_key")

    async def open_request(self, record_id: str, request_id: str, replica_id: str) -> str:
        return await self._call("open_request", record_id, request_id, replica_id)

    async def close_request(self, record_id: str) -> None:
        await self._call("close_request", record_id)

    async def record_outcome(
        self, record_id: str, request_id: str, outcome: str, reason: str = ""
    ) -> None:
        await self._call("record_outcome", record_id, request_id, outcome, reason)

    async def sweep_lost_requests(self, grace_sec: float) -> int:
        return await self._call("sweep_lost_requests", grace_sec)

    async def record_rejection(self, request_id: str, reason: str) -> None:
        await self._call("record_rejection", request_id, reason)

    async def outcome_totals(self) -> dict[str, Any]:
        return await self._call("outcome_totals")

    async def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        return await self._call("outcome_ledger", request_ids)

    async def report_load(
        self, replica_id: str, seq: int, ongoing: int, queued: int, expires_at: float
    ) -> None:
        await self._call("report_load", replica_id, seq, ongoing, queued, expires_at)

    async def load(self) -> dict[str, int]:
        return await self._call("load")
