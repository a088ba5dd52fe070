"""Per-user conversation state: the session record, the chat prompt view of it, and stores.

A session is identified by a random id carried in a signed, HttpOnly cookie. Its record is a
plain dict (so it crosses Ray's object store cheaply):
    {"messages": [{"role", "content", "message_id"?}], "params": {...}, "feedback": {...}}
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from serve_app.engines.base import ChatMessage, PromptFormatter


def new_session_record() -> dict[str, Any]:
    return {"messages": [], "params": {}, "feedback": {}}


class CookieSigner:
    """Signs session ids into cookie values and checks them back."""

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


class SessionTable:
    """Session records with a time-to-live and a size bound (least recently used go first).

    Used directly as the in-memory store and inside the Ray actor that shares it."""

    def __init__(self, ttl_sec: float, max_sessions: int = 100_000) -> None:
        self.ttl_sec = ttl_sec
        self.max_sessions = max_sessions
        self._records: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, session_id: str) -> dict[str, Any] | None:
        entry = self._records.get(session_id)
        if entry is None:
            return None
        stamp, record = entry
        if time.monotonic() - stamp > self.ttl_sec:
            del self._records[session_id]
            return None
        self._records.move_to_end(session_id)
        return record

    def put(self, session_id: str, record: dict[str, Any]) -> None:
        self._records[session_id] = (time.monotonic(), record)
        self._records.move_to_end(session_id)
        while len(self._records) > self.max_sessions:
            self._records.popitem(last=False)

    def __len__(self) -> int:
        return len(self._records)


class InMemorySessionStore:
    """Sessions of one ingress replica (`session_store=memory`)."""

    def __init__(self, ttl_sec: float) -> None:
        self._table = SessionTable(ttl_sec)

    async def load(self, session_id: str) -> dict[str, Any] | None:
        return self._table.get(session_id)

    async def save(self, session_id: str, record: dict[str, Any]) -> None:
        self._table.put(session_id, record)


class RaySessionStore:
    """Sessions shared by every ingress replica, kept in the app's shared-state actor."""

    def __init__(self, state_actor: Any) -> None:
        self._actor = state_actor

    async def load(self, session_id: str) -> dict[str, Any] | None:
        return await self._actor.load_session.remote(session_id)

    async def save(self, session_id: str, record: dict[str, Any]) -> None:
        await self._actor.save_session.remote(session_id, record)


def trim_history(messages: list[dict[str, Any]], max_turns: int) -> list[dict[str, Any]]:
    """Keep the newest `max_turns` user turns (each with the answer that follows it)."""
    user_positions = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(user_positions) <= max_turns:
        return messages
    return messages[user_positions[-max_turns] :]


class ChatPrompt:
    """The conversation of one session, as the model sees it (the seed's `chat_prompt`)."""

    def __init__(
        self, messages: list[dict[str, Any]], formatter: PromptFormatter, system_prompt: str = ""
    ) -> None:
        self.messages = messages
        self.formatter = formatter
        self.system_prompt = system_prompt

    def chat_messages(self) -> list[ChatMessage]:
        turns = [ChatMessage(m["role"], m["content"]) for m in self.messages]
        if self.system_prompt:
            turns.insert(0, ChatMessage("system", self.system_prompt))
        return turns

    def create_prompt(self) -> str:
        """The prompt text for the history so far, ready for the model's next answer."""
        return self.formatter.render(self.chat_messages())


class SessionView:
    """What `request.state.session` holds: the seed's `session_mgr.get_session()` API."""

    def __init__(
        self, session_id: str, record: dict[str, Any], chat_prompt: ChatPrompt, is_new: bool
    ) -> None:
        self.session_id = session_id
        self.record = record
        self.chat_prompt = chat_prompt
        self.is_new = is_new

    def update(self, record: dict[str, Any]) -> None:
        """Follow the stored record after a save (the callback then sees the new history)."""
        self.record = record
        self.chat_prompt.messages = record["messages"]

    def get_session(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "chat_prompt": self.chat_prompt,
            "generation_params": dict(self.record.get("params", {})),
        }
