"""Inject one fault into a running ChatStream service, then wait until it recovered.

    python -m loadtest.fault --address 10.0.0.5:6379 [--app chatstream] [--deployment ChatModel]
    python -m loadtest.fault --kind state-actor --address 10.0.0.5:6379 [--app chatstream]
    python -m loadtest.fault --kind redis-restart --redis-dir DIR [--down-sec 3]
    python -m loadtest.fault --kind redis-kill --redis-dir DIR [--down-sec 3]
    python -m loadtest.fault --kind scale --address 10.0.0.5:6379 [--replicas 1,3] [--hold-sec 3]

Kinds:
- `replica` (default): kill one replica of a Serve deployment with Ray's own API
  (`ray.kill(..., no_restart=True)`); recovered when Serve runs a new one.
- `state-actor`: kill the app's shared-state actor (`chatstream-state-<app>` in the Ray namespace
  `chatstream`, session_store=ray) with restart allowed, as a node loss would; recovered when
  it answers again. `state_lost` says whether its outcome totals went backwards (the actor
  restarted empty) or were read back.
- `redis-restart` / `redis-kill`: stop the Redis of session_store=redis (SIGTERM: a clean
  shutdown; SIGKILL: a crash), keep it down for `--down-sec`, start it again from its own
  configuration file (`<dir>/redis.conf`, as tests/redis_server.py writes it; its pid is in
  `<dir>/redis.pid`); recovered when it answers PING. With an append-only file
  (`appendfsync always`) no acknowledged write is lost.
- `scale`: not a fault but the routine that must look like none: change the model
  deployment's replica count through the Serve config, as KubeRay does after `kubectl scale`
  (the running config with only the `ChatModel` override's `num_replicas` changed, PUT to the
  dashboard like `serve deploy`), for each count of `--replicas` in turn, waiting each time
  until Serve runs exactly that many (the removed ones drained and gone) and holding it
  `--hold-sec`. Recovered when every step settled and the ingress replicas are the same ones
  as before (a scale must not restart them); `killed` names the steps.

Run as its own process (the load test spawns it): Ray must not share a process with Locust's
gevent monkey-patching. Prints one JSON line:
{"killed", "recovered", "seconds", "detail", "kind", "down_at", "up_at", "state_lost"}
(`down_at`/`up_at`: wall-clock times the state holder went away and answered again).

The scale itself is in `loadtest/fault_scale.py`, the Sentinel failover in
`loadtest/fault_sentinel.py`.

`gcs_address_for_port(port)` finds the Ray cluster of a service started on this machine (e.g. by
`serve_app.local_server.LocalServe`): the process listening on the Serve HTTP port is a Ray
worker whose ancestors were started with `--gcs-address=<ip:port>`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from loadtest.fault_scale import scale_deployment
from loadtest.fault_sentinel import fail_over, is_sentinel_dir
from loadtest.options import FAULT_KINDS as KINDS

REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve names replica actors SERVE_REPLICA::app#deployment#id
SERVE_NAMESPACE = "serve"
STATE_NAMESPACE = "chatstream"  # serve_app.stores.ray_actor: actor chatstream-state-<app>
REDIS_SERVER = "/usr/bin/redis-server"


def _gcs_flag(process: psutil.Process) -> str:
    try:
        for arg in process.cmdline():
            if arg.startswith("--gcs-address="):
                return arg.split("=", 1)[1]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        pass
    return ""


def gcs_address_for_port(port: int) -> str:
    """The GCS address of the local Ray cluster whose process listens on TCP `port`, or ""."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.pid is None:
            continue
        process: psutil.Process | None = psutil.Process(conn.pid)
        while process is not None:
            if address := _gcs_flag(process):
                return address
            process = process.parent()
    return ""


def gcs_address_under(pid: int) -> str:
    """The GCS address of a Ray cluster started by process `pid` (e.g. `serve run`), or ""."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return ""
    for child in children:
        if address := _gcs_flag(child):
            return address
    return ""


def replica_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of `deployment` in `app` (any app when `app` is "")."""
    import ray

    names = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] != SERVE_NAMESPACE or not name.startswith(REPLICA_PREFIX):
            continue
        replica_app, _, rest = name[len(REPLICA_PREFIX) :].partition("#")
        if rest.partition("#")[0] == deployment and (not app or replica_app == app):
            names.append(name)
    return sorted(names)


def app_of(replica_name: str) -> str:
    return replica_name[len(REPLICA_PREFIX) :].partition("#")[0]


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or application.status != "RUNNING":
        return 0
    status = application.deployments.get(deployment)
    if status is None or status.status != "HEALTHY":
        return 0
    return int(status.replica_states.get("RUNNING", 0))


def kill_one_replica(app: str, deployment: str, recovery_timeout: float) -> dict[str, object]:
    import ray

    before = replica_names(app, deployment)
    if not before:
        where = f"{app}#{deployment}" if app else f"any app's {deployment}"
        return {"killed": "", "recovered": False, "detail": f"no replica of {where}"}
    victim = before[0]
    app = app_of(victim)
    before = replica_names(app, deployment)
    ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
    killed_at = time.monotonic()
    deadline = killed_at + recovery_timeout
    detail = "waiting for a new replica"
    while time.monotonic() < deadline:
        time.sleep(0.5)
        new = [name for name in replica_names(app, deployment) if name not in before]
        if not new:
            continue
        if running_replicas(app, deployment) >= len(before):
            seconds = round(time.monotonic() - killed_at, 1)
            return {"killed": victim, "recovered": True, "seconds": seconds, "detail": new[0]}
        detail = f"new replica {new[0]} not RUNNING yet"
    return {"killed": victim, "recovered": False, "detail": f"after {recovery_timeout}s: {detail}"}


def kill_state_actor(app: str, recovery_timeout: float) -> dict[str, object]:
    """Kill the app's shared-state actor (restart allowed) and wait until it answers again."""
    import ray

    name = f"chatstream-state-{app or 'chatstream'}"
    try:
        actor = ray.get_actor(name, namespace=STATE_NAMESPACE)
    except ValueError:
        return {"killed": "", "recovered": False, "detail": f"no actor {name}"}
    before = ray.get(actor.outcome_totals.remote(), timeout=30)
    ray.kill(actor, no_restart=False)
    down_at = time.time()
    deadline = time.monotonic() + recovery_timeout
    detail = "waiting for the actor to restart"
    while time.monotonic() < deadline:
        try:
            after = ray.get(actor.outcome_totals.remote(), timeout=5)
        except Exception as exc:  # restarting: calls fail or time out meanwhile
            detail = f"not answering yet: {type(exc).__name__}"
            time.sleep(0.2)
            continue
        up_at = time.time()
        lost = after.get("admitted", 0) < before.get("admitted", 0) or any(
            after.get("rejections", {}).get(k, 0) < v
            for k, v in before.get("rejections", {}).items()
        )
        return {
            "killed": name,
            "recovered": True,
            "seconds": round(up_at - down_at, 1),
            "detail": "restarted empty: its state is gone" if lost else "restarted, state kept",
            "down_at": down_at,
            "up_at": up_at,
            "state_lost": lost,
        }
    return {"killed": name, "recovered": False, "detail": f"after {recovery_timeout}s: {detail}"}


def _redis_port(directory: Path) -> int:
    for line in (directory / "redis.conf").read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "port":
            return int(value)
    raise ValueError(f"no port in {directory / 'redis.conf'}")


def redis_answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def restart_redis(
    directory: Path, down_sec: float, hard: bool, recovery_timeout: float
) -> dict[str, object]:
    """Stop the Redis that runs from `directory` (by the pid in its pidfile), keep it down for
    `down_sec`, start it again from its configuration file, wait until it answers PING."""
    port = _redis_port(directory)
    pid = int((directory / "redis.pid").read_text().strip())
    process = psutil.Process(pid)
    title = " ".join(process.cmdline())
    if "redis-server" not in title or f":{port}" not in title:
        return {"killed": "", "recovered": False, "detail": f"pid {pid} is not Redis: {title}"}
    process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    down_at = time.time()
    killed = f"redis-server pid {pid} on port {port} ({'SIGKILL' if hard else 'SIGTERM'})"
    if _running(pid):
        return {"killed": "", "recovered": False, "detail": f"{killed}: still running after 30s"}
    time.sleep(down_sec)
    new = subprocess.Popen(
        [REDIS_SERVER, str(directory / "redis.conf")],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives this process; stopped by its pid (redis.pid)
    )
    deadline = time.monotonic() + recovery_timeout
    while time.monotonic() < deadline:
        if redis_answers(port):
            up_at = time.time()
            return {
                "killed": killed,
                "recovered": True,
                "seconds": round(up_at - down_at, 1),
                "detail": f"restarted as pid {new.pid}",
                "down_at": down_at,
                "up_at": up_at,
                "state_lost": False,
            }
        if new.poll() is not None:
            return {"killed": killed, "recovered": False, "detail": f"exited {new.returncode}"}
        time.sleep(0.05)
    return {"killed": killed, "recovered": False, "detail": f"no PING after {recovery_timeout}s"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="replica")
    parser.add_argument("--address", default="", help="GCS address of the Ray cluster")
    parser.add_argument("--app", default="", help="Serve application (default: any)")
    parser.add_argument("--deployment", default="ChatModel")
    parser.add_argument("--redis-dir", type=Path, help="redis-*: the directory of redis.conf")
    parser.add_argument("--down-sec", type=float, default=3.0, help="redis-*: time kept down")
    parser.add_argument("--recovery-timeout", type=float, default=90.0)
    parser.add_argument(
        "--replicas", default="1,3", help="scale: the replica counts to go through, in order"
    )
    parser.add_argument(
        "--hold-sec", type=float, default=3.0, help="scale: how long each count is kept"
    )
    args = parser.parse_args(argv)
    result: dict[str, object]
    if args.kind.startswith("redis-"):
        if args.redis_dir is None:
            parser.error(f"--kind {args.kind} needs --redis-dir")
        result = {"kind": args.kind}
        hard = args.kind == "redis-kill"
        try:
            if is_sentinel_dir(args.redis_dir):
                result |= fail_over(args.redis_dir, args.down_sec, hard, args.recovery_timeout)
            else:
                result |= restart_redis(args.redis_dir, args.down_sec, hard, args.recovery_timeout)
        except (OSError, ValueError, psutil.Error) as exc:
            result |= {"killed": "", "recovered": False, "detail": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return 0 if result.get("recovered") else 1
    if not args.address:
        parser.error(f"--kind {args.kind} needs --address")

    # A local cluster started by `ray.init()` (as `serve run` does) uses token authentication
    # with the token in ~/.ray/auth_token; a driver that connects to it must opt in.
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    context = ray.init(
        address=args.address,
        namespace=SERVE_NAMESPACE,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        if args.kind == "scale":
            steps = [int(n) for n in args.replicas.split(",") if n.strip()]
            result = scale_deployment(
                f"http://{context.dashboard_url}",
                args.app,
                args.deployment,
                steps,
                args.hold_sec,
                args.recovery_timeout,
            )
        elif args.kind == "state-actor":
            result = kill_state_actor(args.app, args.recovery_timeout)
        else:
            result = kill_one_replica(args.app, args.deployment, args.recovery_timeout)
    finally:
        ray.shutdown()
    result = {"kind": args.kind, **result}
    print(json.dumps(result), flush=True)
    return 0 if result.get("recovered") else 1


if __name__ == "__main__":
    sys.exit(main())
