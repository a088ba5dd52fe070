"""Per-user sessions: the signed cookie that carries a session id, the view of a session that
a request works with (`request.state.session`), and `Sessions`, which opens and changes them
in the store.

The records themselves, and every change to them, are in `session_state`; the stores that
keep them in `stores/`.
"""

from __future__ import annotations

import secrets
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from serve_app.config import ChatStreamConfig
from serve_app.conversation import ChatPrompt
from serve_app.engines.base import PromptFormatter
from serve_app.refusals import store_unavailable
from serve_app.session_state import Record, SessionChange, new_record
from serve_app.stores import StateStore, StoreUnavailable


class CookieSigner:
    """Signs session ids into cookie values and checks them back. The signature carries its
    time, and every response re-signs the cookie, so a cookie expires from last use."""

    def __init__(self, secret: str, max_age_sec: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="chatstream-session")
        self.max_age_sec = max_age_sec

    def sign(self, session_id: str) -> str:
        return self._serializer.dumps(session_id)

    def unsign(self, cookie_value: str | None) -> str | None:
        if not cookie_value:
            return None
        try:
            return self._serializer.loads(cookie_value, max_age=self.max_age_sec)
        except BadSignature:  # also covers expired signatures
            return None


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


class SessionView:
    """What `request.state.session` holds: the seed's `session_mgr.get_session()` API.

    `stored`: whether the store has this session (a first-time client's view is not stored
    until something is saved, so requests that only read create nothing)."""

    def __init__(
        self, session_id: str, record: Record, chat_prompt: ChatPrompt, stored: bool
    ) -> None:
        self.session_id = session_id
        self.record = record
        self.chat_prompt = chat_prompt
        self.stored = stored

    def update(self, record: Record) -> None:
        """Follow the stored record after a change (the callback then sees the new history)."""
        self.record = record
        self.chat_prompt.messages = record["messages"]
        self.stored = True

    def get_session(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "chat_prompt": self.chat_prompt,
            "generation_params": dict(self.record.get("params", {})),
        }


class Sessions:
    """Opens a request's session and changes it in the store (atomically, on the store's
    side). A store that cannot be reached is a 503 `Refusal`."""

    def __init__(
        self,
        store: StateStore,
        signer: CookieSigner,
        formatter: PromptFormatter,
        config: ChatStreamConfig,
    ) -> None:
        self.store = store
        self._signer = signer
        self._formatter = formatter
        self._config = config
        self._defaults = config.generation_defaults().model_dump()

    async def open(self, request: Request) -> SessionView:
        """The request's session (a new, not yet stored one if the cookie names none), also
        exposed as `request.state.session`."""
        session_id = self._signer.unsign(request.cookies.get(self._config.session_cookie_name))
        try:
            record = await self.store.load_session(session_id) if session_id else None
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None
        stored = record is not None
        view = SessionView(
            session_id if stored else new_session_id(),
            record if stored else new_record(),
            ChatPrompt(
                record["messages"] if stored else [],
                self._formatter,
                self._config.system_prompt,
            ),
            stored=stored,
        )
        request.state.session = view
        return view

    async def change(self, view: SessionView, change: SessionChange) -> None:
        """Apply `change` to the stored session and keep the view in step."""
        try:
            view.update(await self.store.change_session(view.session_id, change))
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None

    def generation_params(self, view: SessionView) -> dict[str, Any]:
        """The session's generation parameters: the app's defaults, overridden by the session's."""
        return {**self._defaults, **view.record["params"]}

    def with_cookie(self, response: Response, view: SessionView | None) -> Response:
        """Set (or refresh: expiry counts from last use) the cookie of a stored session."""
        if view is not None and view.stored:
            response.set_cookie(
                self._config.session_cookie_name,
                self._signer.sign(view.session_id),
                max_age=self._config.session_ttl_sec,
                httponly=True,
                samesite="lax",
                secure=self._config.cookie_secure,
            )
        return response
