"""Kill one replica of a Serve deployment with Ray's own API, then wait until Serve replaced it.

    python -m loadtest.fault --address 10.0.0.5:6379 [--app chatstream] [--deployment ChatModel]

Run as its own process (the load test spawns it): Ray must not share a process with Locust's
gevent monkey-patching. Prints one JSON line: {"killed", "recovered", "seconds", "detail"}.

`gcs_address_for_port(port)` finds the Ray cluster of a service started on this machine (e.g. by
`serve_app.local_server.LocalServe`): the process listening on the Serve HTTP port is a Ray
worker whose ancestors were started with `--gcs-address=<ip:port>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psutil

REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve names replica actors SERVE_REPLICA::app#deployment#id
SERVE_NAMESPACE = "serve"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="GCS address of the Ray cluster")
    parser.add_argument("--app", default="", help="Serve application (default: any)")
    parser.add_argument("--deployment", default="ChatModel")
    parser.add_argument("--recovery-timeout", type=float, default=90.0)
    args = parser.parse_args(argv)

    # A local cluster started by `ray.init()` (as `serve run` does) uses token authentication
    # with the token in ~/.ray/auth_token; a driver that connects to it must opt in.
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.init(
        address=args.address,
        namespace=SERVE_NAMESPACE,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        result = kill_one_replica(args.app, args.deployment, args.recovery_timeout)
    finally:
        ray.shutdown()
    print(json.dumps(result), flush=True)
    return 0 if result.get("recovered") else 1


if __name__ == "__main__":
    sys.exit(main())
