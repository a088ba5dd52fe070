"""The load test's store fault, end to end: ChatStream on the Redis store (a redis-server of the
test's own, durable, its URL passed as CHATSTREAM_REDIS_URL), Redis restarted mid-run by the
load test's fault injector. Every admitted request is accounted exactly, the requests refused
meanwhile are 503 store_unavailable at the client, and /load returns to 0/0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run_profile import PROFILES, locust_command
from serve_app.config import REDIS_URL_ENV
from serve_app.local_server import LocalServe

ROOT = Path(__file__).resolve().parents[2]


def test_the_redis_fault_injector_restarts_the_servers_redis(own_redis) -> None:
    for kind in ("redis-restart", "redis-kill"):
        before = own_redis.pid()
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.fault", "--kind", kind, "--redis-dir", own_redis.dir],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["kind"] == kind and result["recovered"] and not result["state_lost"]
        assert own_redis.running() and own_redis.pid() != before
    own_redis.stop()  # stops the injector's instance, by the pid in its pidfile
    assert not own_redis.running()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_restart_profile_keeps_the_accounting_exact(tmp_path: Path, own_redis) -> None:
    profile = PROFILES["redis-restart"]
    log = tmp_path / "serve.log"
    with LocalServe(profile.service, log_path=log, env={REDIS_URL_ENV: own_redis.url}) as server:
        command = locust_command(
            "redis-restart", profile, server.url, tmp_path, redis_dir=own_redis.dir
        )
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
        )
    output = (done.stdout + done.stderr)[-12000:]
    service_log = log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)"
    assert done.returncode == 0, f"{output}\n--- service log tail ---\n{service_log}"

    report = json.loads((tmp_path / "redis-restart-accounting.json").read_text())
    assert report["ok"] and not report["differences"] and not report["extra_failures"]
    fault = report["run"]["fault"]
    assert fault["kind"] == "redis-restart" and fault["recovered"], fault
    assert "SIGTERM" in fault["killed"]
    # Requests met the outage: refused with 503 store_unavailable, counted by the clients.
    assert report["store_unavailable_seen_by_clients"] > 0, output
    seen = {row["key"]: row["client"] for row in report["rows"]}
    assert seen["success"] > 0 and seen["client_disconnected_while_streaming"] > 0
    # The final check already required /load == 0/0 (after the run and after a fresh request).
