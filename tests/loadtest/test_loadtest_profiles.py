"""The load test end to end: the CI and fault profiles run headless against a service started on
loopback (mock engine) and must exit 0, i.e. the outcome accounting matched exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import run_load_profiles

ROOT = Path(__file__).resolve().parents[2]


def test_locustfile_loads_and_lists_its_users() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for user in ("ChatUser", "EarlyQuitterUser", "MidStreamQuitterUser", "BadInputUser"):
        assert user in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_ci_and_fault_profiles_match_the_server_accounting(tmp_path: Path) -> None:
    run_load_profiles(["ci", "fault"], tmp_path, "serve-ci-fault.log", timeout_s=450)

    ci = json.loads((tmp_path / "ci-accounting.json").read_text())
    assert ci["ok"]
    seen = {row["key"]: row["client"] for row in ci["rows"]}
    for outcome in (
        "success",
        "client_disconnected_while_streaming",
        "client_disconnected_before_streaming",
        "unknown_error_occurred",  # the failing-prompt users
    ):
        assert seen[outcome] > 0, f"the CI profile never produced {outcome}: {seen}"

    fault = json.loads((tmp_path / "fault-accounting.json").read_text())
    assert fault["ok"]
    assert fault["run"]["fault"]["killed"].startswith("SERVE_REPLICA::chatstream#ChatModel#")
    assert fault["run"]["fault"]["recovered"]
    assert (tmp_path / "ci.html").exists() and (tmp_path / "ci_stats.csv").exists()
