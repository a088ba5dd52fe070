"""The load test's OpenAI user keeps the accounting exact with the shared quitter
(loadtest/stream_user.py): a short headless run of OpenAIUser alone (streams read to the end,
whole answers, quits mid-stream and before the first chunk) against the mock engine on loopback
must exit 0, with the server's outcomes matching the clients' request by request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.local_server import LocalServe
from tests.loadtest.test_loadtest_responses import SERVICE
from tests.support import run_locust

ONLY_OPENAI = [
    *("--chatter-weight", "0", "--early-quitter-weight", "0", "--mid-stream-quitter-weight", "0"),
    *("--bad-input-weight", "0", "--openai-weight", "1", "--responses-weight", "0"),
    *("--answer-tokens", "8"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_openai_users_accounting_is_exact(tmp_path: Path) -> None:
    report_path = tmp_path / "openai-accounting.json"
    with LocalServe(SERVICE, log_path=tmp_path / "serve.log") as server:
        done = run_locust(
            server.url,
            ["-u", "8", "-r", "8", "-t", "18s", "--only-summary", *ONLY_OPENAI]
            + ["--accounting-report", str(report_path)],
            timeout_s=200,
        )
    output = (done.stdout + done.stderr)[-12000:]
    assert done.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["ok"] and not report["differences"], output
    seen = {row["key"]: row["client"] for row in report["rows"]}
    assert seen.get("success", 0) > 0, output
    assert seen.get("client_disconnected_while_streaming", 0) > 0, output  # the quitters ran
    assert "openai quit mid-stream" in done.stdout + done.stderr, output
    # The structured-output task ran; a wrong answer would be a violation in the report.
    assert "openai structured" in done.stdout + done.stderr, output
    # The `n` choices task ran (one request, one outcome each; a missing choice is a violation).
    assert "openai n choices" in done.stdout + done.stderr, output
