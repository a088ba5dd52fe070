"""One Ray actor per application that every ingress replica shares: sessions, outcome ledger,
load reports and the cookie-signing key. It holds state only; the logic lives in the pure
classes it wraps (`SessionTable`, `OutcomeLedger`)."""

from __future__ import annotations

import contextvars
import secrets
from typing import Any

import ray

from serve_app.outcomes import OutcomeLedger
from serve_app.sessions import SessionTable

STATE_NAMESPACE = "chatstream"


@ray.remote(num_cpus=0, max_restarts=-1)
class SharedState:
    def __init__(self, session_ttl_sec: float, ledger_size: int) -> None:
        self._secret = secrets.token_urlsafe(32)
        self._sessions = SessionTable(session_ttl_sec)
        self._ledger = OutcomeLedger(ledger_size)
        self._load: dict[str, tuple[int, int]] = {}

    def session_secret(self) -> str:
        return self._secret

    def load_session(self, session_id: str) -> dict[str, Any] | None:
        return self._sessions.get(session_id)

    def save_session(self, session_id: str, record: dict[str, Any]) -> None:
        self._sessions.put(session_id, record)

    def record_outcome(self, request_id: str, outcome: str) -> None:
        self._ledger.record_outcome(request_id, outcome)

    def record_rejection(self, request_id: str, reason: str) -> None:
        self._ledger.record_rejection(request_id, reason)

    def outcome_totals(self) -> dict[str, Any]:
        return self._ledger.totals()

    def outcome_ledger(self, request_ids: list[str] | None) -> dict[str, dict[str, str]]:
        return self._ledger.lookup(request_ids)

    def report_load(self, replica_id: str, ongoing: int, queued: int) -> None:
        self._load[replica_id] = (ongoing, queued)

    def load(self) -> dict[str, int]:
        return {
            "ongoing": sum(o for o, _ in self._load.values()),
            "queued": sum(q for _, q in self._load.values()),
        }


class _DetachedMethod:
    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return contextvars.Context().run(self._method.remote, *args, **kwargs)


class DetachedActor:
    """An actor handle whose calls are submitted outside the current request's context.

    Inside a Serve request, Ray treats an actor call as a child of the request: when the client
    disconnects and Serve cancels the request, calls not yet sent are cancelled too, and the
    actor then stalls (up to 30 s) waiting for the missing sequence number, holding up every
    other replica's calls. Bookkeeping must survive the request it describes, so each call is
    made from a fresh, empty context.
    """

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def __getattr__(self, name: str) -> _DetachedMethod:
        return _DetachedMethod(getattr(self._actor, name))


def get_shared_state(app_name: str, session_ttl_sec: float, ledger_size: int) -> DetachedActor:
    """The app's shared-state actor, created by whichever replica asks first.

    Detached so that it outlives a redeploy of the app's replicas (sessions survive updates);
    it goes away with the Ray cluster.
    """
    actor = SharedState.options(
        name=f"chatstream-state-{app_name}",
        namespace=STATE_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(session_ttl_sec, ledger_size)
    return DetachedActor(actor)
