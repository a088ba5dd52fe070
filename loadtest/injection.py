"""When and how the Locust process has a fault injected: `python -m loadtest.fault`, in its own
process (Ray must not share a process with Locust's gevent), `--fault-at` seconds into the run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import gevent

from loadtest.options import Options
from loadtest.run_state import RUN

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("chatstream.loadtest")


def fault_command(options: Options) -> list[str]:
    """The `python -m loadtest.fault` command line of the configured fault."""
    command = [sys.executable, "-m", "loadtest.fault", "--kind", options.fault_kind]
    if options.fault_kind.startswith("redis-"):
        return command + [
            "--redis-dir",
            options.fault_redis_dir,
            "--down-sec",
            str(options.fault_down_sec),
        ]
    command += ["--address", options.fault_ray_address, "--app", options.fault_app]
    command += ["--deployment", options.fault_deployment]
    if options.fault_kind == "scale":
        command += ["--replicas", options.fault_scale_replicas]
        command += ["--hold-sec", str(options.fault_scale_hold_sec)]
    return command


def problem(options: Options) -> str:
    """Why the configured fault cannot be injected ("" if it can)."""
    if options.fault_kind.startswith("redis-") and not options.fault_redis_dir:
        return f"--fault-kind {options.fault_kind} needs --fault-redis-dir"
    if not options.fault_kind.startswith("redis-") and not options.fault_ray_address:
        return "--fault-at needs --fault-ray-address (the service's Ray cluster)"
    return ""


def schedule() -> None:
    """Start the fault injection of this run, if one is configured (and possible)."""
    if RUN.options.fault_at <= 0:
        return
    if reason := problem(RUN.options):
        RUN.unsupported = reason
    else:
        RUN.fault_greenlet = gevent.spawn(inject_fault)


def inject_fault() -> None:
    """Inject the fault once, `--fault-at` seconds into the run, from a separate process.

    For a replica kill, quitters pause first (and their in-flight requests finish), so that no
    quit races the kill: a stream the kill cuts ends as unknown_error_occurred on both sides,
    unambiguously. Store faults need no pause: a quit is recorded once the store is back.
    """
    options = RUN.options
    gevent.sleep(options.fault_at)
    RUN.fault.attempted = True
    RUN.fault.kind = options.fault_kind
    try:
        if options.fault_kind == "replica":
            RUN.quiet = True
            deadline = time.monotonic() + 30
            while RUN.quitters_in_flight and time.monotonic() < deadline:
                gevent.sleep(0.05)
        command = fault_command(options)
        logger.info("fault injection: %s", " ".join(command))
        RUN.fault.started_at = time.time()
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
        )
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
        RUN.fault.up_at = float(result.get("up_at") or time.time())
        RUN.fault.first_id_after = RUN.next_number
        RUN.fault.killed = result.get("killed", "")
        RUN.fault.recovered = bool(result.get("recovered"))
        RUN.fault.state_lost = bool(result.get("state_lost"))
        RUN.fault.detail = result.get("detail", "") or done.stderr.strip()[-2000:]
        logger.info("fault injection result: %s", result or done.stderr[-2000:])
    except Exception as exc:  # reported as a failed check at the end
        RUN.fault.detail = f"{type(exc).__name__}: {exc}"
        RUN.fault.up_at = RUN.fault.up_at or time.time()
        logger.exception("fault injection failed")
    finally:
        RUN.quiet = False
