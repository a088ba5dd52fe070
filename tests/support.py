"""Helpers shared by the serve_app tests: a running service and polite HTTP clients."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx


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


def outcome_of(base_url: str, request_id: str, timeout_s: float = 15.0) -> str:
    """The server's recorded outcome for `request_id` (waits for it to be recorded)."""

    def lookup() -> str | None:
        ledger = httpx.get(f"{base_url}/outcomes/ledger", params={"request_id": request_id}).json()
        return ledger["outcomes"].get(request_id)

    return wait_for(lookup, timeout_s)
