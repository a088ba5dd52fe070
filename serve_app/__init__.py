"""ChatStream on Ray Serve.

`serve run serve_app:app` serves the default model; `serve_app.ChatStream` is the facade for
your own FastAPI routes. Imports are lazy so that `serve_app.config` stays light (it imports
only pydantic; the operator imports neither it nor Ray: it shares `chatstream_defaults`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ChatStream", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from serve_app.builder import app

        return app
    if name == "ChatStream":
        from serve_app.chat_stream import ChatStream

        return ChatStream
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
