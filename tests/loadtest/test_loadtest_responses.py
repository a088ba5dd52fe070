"""The load test's Responses user keeps the accounting exact: a short headless run of
ResponsesUser alone (stored chains continued, deleted, and store:false quitters) against the
mock engine on loopback must exit 0, with the server's outcomes matching the clients' request
by request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.local_server import LocalServe
from tests.support import run_locust

SERVICE = {
    "engine": "mock",
    "mock_mode": "round",
    "mock_initial_wait_sec": 0.5,  # a quitter's close reaches the service before the answer
    "mock_time_per_token_sec": 0.02,
    "max_ongoing_requests": 3,
    "max_queued_requests": 3,
}
ONLY_RESPONSES = [
    *("--chatter-weight", "0", "--early-quitter-weight", "0", "--mid-stream-quitter-weight", "0"),
    *("--bad-input-weight", "0", "--openai-weight", "0", "--responses-weight", "1"),
    *("--turns", "3", "--answer-tokens", "8"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_responses_users_accounting_is_exact(tmp_path: Path) -> None:
    report_path = tmp_path / "responses-accounting.json"
    with LocalServe(SERVICE, log_path=tmp_path / "serve.log") as server:
        done = run_locust(
            server.url,
            ["-u", "8", "-r", "8", "-t", "18s", "--only-summary", *ONLY_RESPONSES]
            + ["--accounting-report", str(report_path)],
            timeout_s=200,
        )
    output = (done.stdout + done.stderr)[-12000:]
    assert done.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["ok"] and not report["differences"], output
    seen = {row["key"]: row["client"] for row in report["rows"]}
    assert seen.get("success", 0) > 0, output
    assert "/v1/responses/{id}" in done.stdout + done.stderr, output  # chains were deleted
    assert "/v1/chat/completions" not in done.stdout and "openai stream" not in done.stdout
