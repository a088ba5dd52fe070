"""The Sentinel failover under load (issue 25): ChatStream on the Redis store behind Sentinel
(`redis+sentinel://`, a primary, one replica, three sentinels, all durable), the primary
killed with SIGKILL mid-run by the load test's fault injector. The sentinels fail over; the
`sentinel-failover` profile's accounting stays exact, no request hangs, and a conversation
started before the failover is still there after it, through its cookie."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtest.fault_sentinel import settled_primary
from loadtest.run_profile import PROFILES, locust_command, redis_shape_of, redis_store
from serve_app.config import REDIS_URL_ENV
from serve_app.local_server import LocalServe
from tests.redis_server import SentinelSet

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "sentinel-failover"


def test_redis_shape_option_switches_the_service_and_refuses_what_cannot_work() -> None:
    from loadtest.run_profile import main, service_of

    assert redis_shape_of("long", "cluster") == "cluster"
    assert service_of("long", "cluster")["session_store"] == "redis"
    assert redis_shape_of("long") == "" and "session_store" not in service_of("long", "")
    assert redis_shape_of(PROFILE) == "sentinel" == PROFILES[PROFILE].redis_shape
    assert redis_shape_of("state-kill", "sentinel") == "sentinel"  # the failover, by SIGKILL
    for name, shape in (
        ("state-kill", "cluster"),
        ("state-kill-ray", "single"),
        (PROFILE, "single"),
    ):
        with pytest.raises(ValueError):
            redis_shape_of(name, shape)
    with pytest.raises(SystemExit):
        main(["--profile", "state-kill-ray", "--redis-shape", "cluster"])


@pytest.mark.timeout(180)
def test_the_fault_injector_fails_the_sentinel_primary_over(tmp_path: Path) -> None:
    with SentinelSet(replicas=1, sentinels=3, durable=True) as sentinels:
        description = json.loads(sentinels.describe(tmp_path).read_text())
        old = sentinels.primary_port()
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.fault", "--kind", "redis-kill"]
            + ["--redis-dir", str(tmp_path), "--down-sec", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["recovered"] and not result["state_lost"], result
        assert "SIGKILL" in result["killed"] and f"port {old}" in result["killed"]
        assert result["new_primary"] != old  # failed over
        # Whole again: the primary the sentinels name leads every other server. Usually the
        # promoted one; on a loaded machine the sentinels may fail over once more (seen in CI).
        assert sentinels.primary_port() == result["primary"] == settled_primary(description)
        assert sentinels.server_on(old).running()  # back, in the set

        # A second failover, back to the restarted old primary, leaves the set whole too.
        deadline = time.monotonic() + 60
        while not sentinels.request_failover():  # once the sentinel sees the replica up
            assert time.monotonic() < deadline, "the sentinel took no second failover"
            time.sleep(0.5)
        while settled_primary(description) in (None, result["primary"]):
            assert time.monotonic() < deadline, "the second failover did not settle"
            time.sleep(0.2)
        assert settled_primary(description) == sentinels.primary_port()


def _turn(client: httpx.Client, text: str) -> str:
    with client.stream(
        "POST", "/chat_stream", json={"user_input": text, "max_new_tokens": 6}, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        return "".join(response.iter_text())


def _during_a_failover(url: str, fault_dir: str | Path) -> tuple[list[int], list]:
    """Fail the primary over with the injector while one client sends short turns in a row
    (each in a new session, none may hang); their statuses, and the 503s' headers and body."""
    injector = subprocess.Popen(
        [sys.executable, "-m", "loadtest.fault", "--kind", "redis-kill"]
        + ["--redis-dir", str(fault_dir), "--down-sec", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    statuses: list[int] = []
    refusals: list[tuple[httpx.Headers, dict]] = []
    try:
        while injector.poll() is None:
            response = httpx.post(
                f"{url}/chat_stream",
                json={"user_input": "are you there", "max_new_tokens": 2},
                timeout=30,  # a hung request fails the test
            )
            statuses.append(response.status_code)
            if response.status_code == 503:
                refusals.append((response.headers, response.json()))
    finally:
        output = injector.communicate(timeout=150)[0]
    # This failover is here to be seen request by request: the sentinels promoted a replica.
    # (Whether the killed node rejoins as a replica, which takes long on a loaded machine, is
    # asserted for the profile's own failover.)
    assert "new_primary" in output or "new primary" in output, output  # promoted
    return statuses, refusals


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sentinel_failover_profile_is_exact_and_keeps_conversations(tmp_path: Path) -> None:
    profile = PROFILES[PROFILE]
    log = tmp_path / "serve.log"
    with (
        redis_store("sentinel") as (url, fault_dir),
        LocalServe(profile.service, log_path=log, env={REDIS_URL_ENV: url}) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        answer = _turn(client, "remember the blue heron")
        before = client.get("/history").json()["messages"]
        assert [m["role"] for m in before] == ["user", "assistant"], before
        assert before[1]["content"] == answer

        command = locust_command(PROFILE, profile, server.url, tmp_path, redis_dir=fault_dir)
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        elapsed = time.monotonic() - started

        after = client.get("/history").json()["messages"]
        assert after == before, "the conversation did not survive the failover"
        _turn(client, "and now?")  # the conversation goes on, on the new primary
        assert len(client.get("/history").json()["messages"]) == 4

        # The accounting run cannot share the service with other traffic; now, alone, a second
        # failover (back to the first primary) seen request by request: 503 with Retry-After.
        statuses, refusals = _during_a_failover(server.url, fault_dir)
        assert refusals, f"no request met the failover: {statuses}"
        assert set(statuses) <= {200, 503}, statuses
        for headers, body in refusals:
            assert int(headers["retry-after"]) >= 1 and body["error"] == "store_unavailable"
        assert len(client.get("/history").json()["messages"]) == 4

    output = (done.stdout + done.stderr)[-12000:]
    service_log = log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)"
    assert done.returncode == 0, f"{output}\n--- service log tail ---\n{service_log}"
    assert "ACCOUNTING OK" in done.stdout + done.stderr  # before Locust's (long) tables

    report = json.loads((tmp_path / f"{PROFILE}-accounting.json").read_text())
    assert report["ok"] and not report["differences"] and not report["extra_failures"]
    fault = report["run"]["fault"]
    assert fault["kind"] == "redis-kill" and fault["recovered"], fault
    assert "primary" in fault["killed"] and "SIGKILL" in fault["killed"], fault
    assert "promoted" in fault["detail"], fault
    seen = {row["key"]: row["client"] for row in report["rows"]}
    assert seen["success"] > 0 and seen["client_disconnected_while_streaming"] > 0
    # No request hung: 30 s of load, then the users' last requests, the fault's recovery and
    # the final check (which already required /load == 0/0 and a fresh request at once).
    assert elapsed < 200, f"the run took {elapsed:.0f}s"
