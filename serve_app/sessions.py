"""Per-user sessions at the HTTP edge: the signed cookie that carries a session id, and the
view of a session that a request works with (`request.state.session`).

The records themselves, and every change to them, are in `session_state`; the stores that
keep them in `stores/`.
"""

from __future__ import annotations

import secrets
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from serve_app.conversation import ChatPrompt
from serve_app.session_state import Record


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
