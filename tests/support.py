"""Helpers shared by the serve_app tests: a running service and polite HTTP clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from serve_app.config import ADMIN_TOKEN_ENV


def new_request_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def teacher_forced_matches(
    predicted: Sequence[int], ids: Sequence[int], prompt_len: int
) -> tuple[int, int]:
    """(matches, positions) of a teacher-forced top-1 comparison: `ids` is a prompt of
    `prompt_len` tokens and a reference continuation, `predicted[i]` a model's top-1 token after
    reading `ids[: i + 1]`; each continuation token counts once (one early difference does not
    derail the rest, as it would comparing two free-running greedy answers)."""
    positions = range(prompt_len, len(ids))
    return sum(predicted[p - 1] == ids[p] for p in positions), len(positions)


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


def run_load_profiles(
    profiles: list[str], reports_dir: Path, service_log: str, timeout_s: float
) -> None:
    """`python -m loadtest.run_profile --profile ...` into `reports_dir`; fail with its output
    and the tail of the service's log (`service_log`, a file name there) unless it exits 0."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run_profile", "--profile", *profiles]
        + ["--reports-dir", str(reports_dir)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = done.stdout + done.stderr
    log = reports_dir / service_log
    tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no service log)"
    assert done.returncode == 0, load_failure(output, tail, tail_chars=12000)


def accounting_section(output: str) -> str:
    """The accounting report(s) a load run printed (from the table's header to its verdict):
    what went wrong, which the tail of Locust's statistics that follows it does not show."""
    sections, current = [], None
    for line in output.splitlines():
        if line.startswith("outcome / rejection"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("ACCOUNTING "):
                sections.append("\n".join(current))
                current = None
    return "\n\n".join(sections) or "(no accounting report printed)"


def load_failure(output: str, service_tail: str, tail_chars: int = 8000) -> str:
    """The message for a failed load run: its accounting report, the tail of its output, and
    the tail of the service's log."""
    return (
        f"--- accounting ---\n{accounting_section(output)}\n--- output tail ---\n"
        f"{output[-tail_chars:]}\n--- service log tail ---\n{service_tail}"
    )


def run_locust(url: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`locust -f loadtest/locustfile.py --headless --host URL ARGS...`, as a user types it
    (its output captured)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless"]
        + ["--host", url, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
