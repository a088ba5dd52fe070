"""Helpers shared by the serve_app tests: a running service and polite HTTP clients."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from serve_app.config import ADMIN_TOKEN_ENV


def new_request_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.1) -> Any:
    """Poll until `condition()` is truthy; return its value or fail with the last one."""
    deadline = time.monotonic() + timeout_s
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = condition()
    assert value, f"condition not met within {timeout_s}s (last value: {value!r})"
    return value


def admin_headers(token: str | None = None) -> dict[str, str]:
    """The bearer header for the operator endpoints: `token`, else CHATSTREAM_ADMIN_TOKEN from
    the environment; none (a loopback client of a server without a token) if neither is set."""
    token = token or os.environ.get(ADMIN_TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def outcome_of(
    base_url: str, request_id: str, timeout_s: float = 15.0, admin_token: str | None = None
) -> str:
    """The server's recorded outcome for `request_id` (waits for it to be recorded)."""

    def lookup() -> str | None:
        ledger = httpx.get(
            f"{base_url}/outcomes/ledger",
            params={"request_id": request_id},
            headers=admin_headers(admin_token),
        ).json()
        return ledger["outcomes"].get(request_id)

    return wait_for(lookup, timeout_s)
