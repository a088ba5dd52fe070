"""The Redis fault behind Sentinel: kill the primary, let the sentinels fail over, bring the old
primary back as a replica (as its pod would be restarted).

`python -m loadtest.fault --kind redis-kill --redis-dir DIR` takes this path when `DIR` holds a
`sentinel.json` (written by `tests.redis_server.SentinelSet.describe`: the Sentinel service,
the sentinels' ports, each data server's port and directory with its `redis.conf` and
`redis.pid`). `redis-restart` does the same with SIGTERM instead of SIGKILL.

1. ask the sentinels for the primary, SIGKILL it by the pid in its pidfile (checked to be the
   redis-server on that port: a stale pidfile never kills a stranger);
2. wait until every sentinel names one new primary and it answers `ROLE` as a master;
3. at least `down_sec` after the kill, start the old primary again from its `redis.conf`; the
   sentinels turn it into a replica of the new primary;
4. recovered once the set is whole: the sentinels name one primary, and every other server,
   the restarted one included, replicates from it (`master_link_status:up`). From then on an
   outcome's `WAIT` for one replica succeeds again. On a loaded machine the sentinels may
   fail over once more meanwhile (seen in CI, back to the restarted old primary); the set is
   whole all the same, and `primary` says which one leads it.

`down_at` is the kill, `up_at` the end of step 4; `new_primary` is the one first promoted,
`detail` says how long the failover took.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

REDIS_SERVER = "/usr/bin/redis-server"
DESCRIPTION = "sentinel.json"


def is_sentinel_dir(directory: Path) -> bool:
    return (Path(directory) / DESCRIPTION).exists()


def _client(port: int) -> Any:
    import redis

    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def _primary_ports(description: dict[str, Any]) -> set[int]:
    """The primary each sentinel names now (a sentinel that does not answer names none)."""
    ports = set()
    for port in description["sentinels"]:
        try:
            with _client(port) as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(description["service"])
        except Exception:
            continue
        if address:
            ports.add(int(address[1]))
    return ports


def _role(port: int) -> str:
    try:
        with _client(port) as server:
            return str(server.execute_command("ROLE")[0])
    except Exception:
        return ""


def _replicates_from(port: int, primary: int) -> bool:
    try:
        with _client(port) as server:
            info = server.info("replication")
    except Exception:
        return False
    return (
        info.get("role") == "slave"
        and int(info.get("master_port", 0)) == primary
        and info.get("master_link_status") == "up"
    )


def settled_primary(description: dict[str, Any]) -> int | None:
    """The primary of a whole set: the one every answering sentinel names, a master, with
    every other data server replicating from it; None while the set is not whole."""
    named = _primary_ports(description)
    if len(named) != 1:
        return None
    primary = next(iter(named))
    others = [int(s["port"]) for s in description["servers"] if int(s["port"]) != primary]
    if _role(primary) != "master" or not all(_replicates_from(p, primary) for p in others):
        return None
    return primary


def _redis_pid(server: dict[str, Any]) -> int:
    directory, port = Path(server["dir"]), int(server["port"])
    pid = int((directory / "redis.pid").read_text().strip())
    title = " ".join(psutil.Process(pid).cmdline())
    if "redis-server" not in title or f":{port}" not in title:
        raise ValueError(f"pid {pid} is not the redis-server on port {port}: {title}")
    return pid


def _running(process: psutil.Process) -> bool:
    """Whether it runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(check: Any, timeout: float) -> Any:
    """Poll `check` until it gives a truthy value, and return that; None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    return None


def fail_over(
    directory: Path, down_sec: float, hard: bool, recovery_timeout: float
) -> dict[str, object]:
    description = json.loads((Path(directory) / DESCRIPTION).read_text())
    ports = _primary_ports(description)
    if len(ports) != 1:
        return {"killed": "", "recovered": False, "detail": f"sentinels disagree: {ports}"}
    old = ports.pop()
    server = next((s for s in description["servers"] if int(s["port"]) == old), None)
    if server is None:
        return {"killed": "", "recovered": False, "detail": f"primary {old} is not in the set"}
    pid = _redis_pid(server)
    process = psutil.Process(pid)
    process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
    killed = f"primary redis-server pid {pid} on port {old} ({'SIGKILL' if hard else 'SIGTERM'})"
    if not _wait(lambda: not _running(process), 30):
        return {"killed": "", "recovered": False, "detail": f"{killed}: still running after 30s"}
    down_at = time.time()

    new: list[int] = []

    def promoted() -> bool:
        named = _primary_ports(description)
        if len(named) == 1 and old not in named:
            port = next(iter(named))
            if _role(port) == "master":
                new[:] = [port]
                return True
        return False

    if not _wait(promoted, recovery_timeout):
        return {"killed": killed, "recovered": False, "detail": "the sentinels did not fail over"}
    failover_sec = time.time() - down_at
    time.sleep(max(0.0, down_at + down_sec - time.time()))
    restarted = subprocess.Popen(
        [REDIS_SERVER, str(Path(server["dir"]) / "redis.conf")],
        cwd=server["dir"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this process; stopped by its pid (redis.pid)
    )
    primary = _wait(lambda: settled_primary(description), recovery_timeout)
    if primary is None:
        return {
            "killed": killed,
            "recovered": False,
            "detail": f"new primary {new[0]} after {failover_sec:.1f}s; the old primary "
            f"(restarted as pid {restarted.pid}) did not rejoin the set as a replica",
        }
    up_at = time.time()
    back = (
        "replicates from it"
        if primary == new[0]
        else f"rejoined; the sentinels then failed over once more, to port {primary}"
    )
    return {
        "killed": killed,
        "recovered": True,
        "seconds": round(up_at - down_at, 1),
        "detail": f"sentinels promoted port {new[0]} after {failover_sec:.1f}s; the old "
        f"primary restarted as pid {restarted.pid} and {back}",
        "primary": primary,
        "down_at": down_at,
        "up_at": up_at,
        "state_lost": False,
        "new_primary": new[0],
        "failover_sec": round(failover_sec, 1),
    }
