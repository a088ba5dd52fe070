"""Run a load-test profile: start ChatStream on loopback (mock engine), run Locust headless
against it, stop the service. The exit code is Locust's: 0 only if the accounting matched.

    python -m loadtest.run_profile --profile ci          # ~1 min, what CI runs
    python -m loadtest.run_profile --profile ci fault    # both on one service start
    python -m loadtest.run_profile --profile long        # >= 5 min, 60 users, >= 30 % disconnects
    python -m loadtest.run_profile --profile redis-restart state-kill   # store faults (Redis)
    python -m loadtest.run_profile --profile state-kill-ray               # the Ray actor store
    python -m loadtest.run_profile --profile scale        # model replicas 3 -> 1 -> 3 mid-run
    python -m loadtest.run_profile --profile ci --url http://127.0.0.1:8000   # a running service
    python -m loadtest.run_profile --profile long --redis-shape cluster   # soak on a Redis Cluster
    python -m loadtest.run_profile --profile sentinel-failover   # Sentinel primary killed mid-run

Profiles whose service uses session_store=redis start their own redis-server on loopback (in a
temporary directory, with an append-only file) and hand its URL to the service through
CHATSTREAM_REDIS_URL; with --url, pass the Redis directory of the running service instead
(--redis-dir, for the redis fault profiles).

`--redis-shape single|cluster|sentinel` runs the profiles on the Redis store in that shape: one
durable redis-server, a 3-primary Redis Cluster (`redis+cluster://`) or a primary with one
replica and three sentinels (`redis+sentinel://`, outcomes WAIT for the replica). A profile
whose service has no session_store=redis (`ci`, `long`, ...) is switched to it. Without the
option each profile runs as defined (`single` for the Redis fault profiles, `sentinel` for
`sentinel-failover`).

Reports (Locust CSV + HTML, the accounting JSON, the service log) go to loadtest/reports/.
Anything after `--` is passed to Locust.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.options import as_argv

LOADTEST_DIR = Path(__file__).resolve().parent
ROOT = LOADTEST_DIR.parent
LOCUSTFILE = LOADTEST_DIR / "locustfile.py"
FAIL_MARKER = "__chatstream_fail__"

# A small, saturable service: 2 generation slots, 4 queue places, a first token that takes
# 0.5 s (early quitters leave after 0.25 s, so no chunk can have been sent), 20 ms per token.
SMALL_MOCK_SERVICE: dict[str, Any] = {
    "engine": "mock",
    "mock_mode": "long",
    "mock_initial_wait_sec": 0.5,
    "mock_time_per_token_sec": 0.02,
    "mock_fail_marker": FAIL_MARKER,
    "max_ongoing_requests": 2,
    "max_queued_requests": 4,
}
# The same service on the Redis store (a redis-server the run starts; see run_profiles).
REDIS_MOCK_SERVICE: dict[str, Any] = {**SMALL_MOCK_SERVICE, "session_store": "redis"}
# The store faults: Redis stays down this long.
STORE_DOWN_SEC = 3
# The same service with three model replicas (a fifth of a CPU each: they fit on 2 cores), for
# the scale profile: its count changes only through the Serve config's ChatModel override. A
# first token after 2 s: replicas starting and stopping during the run load the machine, and
# the service learns of an early quit (0.25 s) only when Serve's proxy passes the disconnect
# on; if that takes longer than the first token, the quit counts as one while streaming.
SCALED_MOCK_SERVICE: dict[str, Any] = {
    **SMALL_MOCK_SERVICE,
    "mock_initial_wait_sec": 2.0,
    "num_replicas": 3,
    "num_cpus": 0.2,
}
# The soak service: more slots, and a first token after 1 s, which keeps early quits (0.25 s)
# unambiguous even when the machine is overloaded and a close takes long to reach the server.
LARGER_MOCK_SERVICE: dict[str, Any] = {
    **SMALL_MOCK_SERVICE,
    "mock_initial_wait_sec": 1.0,
    "max_ongoing_requests": 8,
    "max_queued_requests": 24,
}


# Tenants: one flooding key and three polite ones, on the set-up (8 slots, 8 queue
# places, 0.05 s per token); answers of 40 tokens (2 s: a slot frees about every 0.25 s).
TENANT_KEYS = "\n".join(
    f"{key_id}:sk-{key_id}-0123456789" for key_id in ("flood", "polite-1", "polite-2", "polite-3")
)
# The final check's fresh request (and OpenAIUser) need a key of their own.
TENANT_ENV = {"CHATSTREAM_API_KEYS": TENANT_KEYS + "\ncheck:sk-check-0123456789",
              "CHATSTREAM_LOADTEST_API_KEY": "sk-check-0123456789"}  # fmt: skip
TENANT_SERVICE: dict[str, Any] = {
    "engine": "mock",
    "mock_mode": "long",
    "mock_time_per_token_sec": 0.05,
    "max_ongoing_requests": 8,
    "max_queued_requests": 8,
}


@dataclass(frozen=True)
class Profile:
    description: str
    service: dict[str, Any]
    users: int
    spawn_rate: float
    run_time: str
    options: dict[str, Any] = field(default_factory=dict)  # loadtest.options.Options fields
    # The service's environment (API keys); Locust gets it too.
    service_env: dict[str, str] = field(default_factory=dict)
    redis_shape: str = "single"  # with session_store=redis: single, cluster or sentinel

    def __post_init__(self) -> None:
        as_argv(self.options)  # an unknown option fails here, not in Locust


# The fault profiles: ten users, a fault six seconds in; each profile names its fault.
FAULT_RUN: dict[str, Any] = {"users": 10, "spawn_rate": 10, "run_time": "22s"}
FAULT_MIX: dict[str, Any] = {
    "chatter_weight": 6,
    "early_quitter_weight": 2,
    "mid_stream_quitter_weight": 2,
    "bad_input_weight": 1,
    "fault_at": 6,
}

PROFILES: dict[str, Profile] = {
    "ci": Profile(
        "short CI run: every behaviour, saturated (429s), engine failures by fail marker",
        SMALL_MOCK_SERVICE,
        users=15,
        spawn_rate=15,
        run_time="25s",
        options={
            "chatter_weight": 6,
            "early_quitter_weight": 3,
            "mid_stream_quitter_weight": 3,
            "bad_input_weight": 2,
            "failing_prompt_weight": 1,
            "fail_marker": FAIL_MARKER,
        },
    ),
    "fault": Profile(
        "kills the model replica once mid-run; counts still match and the service recovers",
        SMALL_MOCK_SERVICE,
        **FAULT_RUN,
        options=FAULT_MIX,
    ),
    "redis-restart": Profile(
        "restarts Redis (session_store=redis; SIGTERM, 3 s down) once mid-run: 503 "
        "store_unavailable meanwhile, every admitted request accounted exactly",
        REDIS_MOCK_SERVICE,
        **{**FAULT_RUN, "run_time": "20s"},
        options={**FAULT_MIX, "fault_kind": "redis-restart", "fault_down_sec": STORE_DOWN_SEC},
    ),
    "state-kill": Profile(
        "kills the state holder mid-run: Redis gets SIGKILL (session_store=redis, append-only "
        "file, fsync always), 3 s down; accounting exact as for redis-restart",
        REDIS_MOCK_SERVICE,
        **{**FAULT_RUN, "run_time": "20s"},
        options={**FAULT_MIX, "fault_kind": "redis-kill", "fault_down_sec": STORE_DOWN_SEC},
    ),
    "state-kill-ray": Profile(
        "kills the state holder mid-run: the shared-state actor (session_store=ray), restart "
        "allowed; it reads its state back from Ray's GCS, so the accounting stays exact",
        SMALL_MOCK_SERVICE,
        **FAULT_RUN,
        options={**FAULT_MIX, "fault_kind": "state-actor"},
    ),
    "scale": Profile(
        "model replicas 3 -> 1 -> 3 mid-run through the Serve config (what `kubectl scale` "
        "does): the removed replicas drain, nothing is cut, the ingress is not restarted, "
        "the accounting stays exact",
        SCALED_MOCK_SERVICE,
        **{**FAULT_RUN, "run_time": "28s"},
        options={
            **FAULT_MIX,
            # Answers of about 4 s: the replicas that go hold streams when the scale comes.
            "answer_tokens": 100,
            "fault_at": 5,
            "fault_kind": "scale",
            "fault_scale_replicas": "1,3",
            "fault_scale_hold_sec": 4,
        },
    ),
    "tenants": Profile(
        "one flooding API key (20 users that send again at once) and three polite ones (one "
        "request at a time): every polite key gets its requests admitted (fair queue); "
        "admissions and first-chunk times per key reported; accounting exact",
        TENANT_SERVICE,
        users=23,
        spawn_rate=23,
        run_time="30s",
        options={
            "chatter_weight": 0,
            "early_quitter_weight": 0,
            "mid_stream_quitter_weight": 0,
            "bad_input_weight": 0,
            "openai_weight": 0,
            "flood_weight": 20,
            "polite_weight": 3,
            "answer_tokens": 40,
        },
        service_env=TENANT_ENV,
    ),
    "long": Profile(
        "soak: 6 minutes, 60 users, about half of them disconnecting",
        LARGER_MOCK_SERVICE,
        users=60,
        spawn_rate=5,
        run_time="6m",
        options={
            "chatter_weight": 4,
            "early_quitter_weight": 3,
            "mid_stream_quitter_weight": 3,
            "bad_input_weight": 1,
            "failing_prompt_weight": 1,
            "fail_marker": FAIL_MARKER,
        },
    ),
}

# The Sentinel fault (its own entry, after the table): the store's primary is killed (SIGKILL)
# six seconds in; the sentinels promote the replica, the old primary comes back as a replica.
PROFILES["sentinel-failover"] = Profile(
    "kills the Redis primary behind Sentinel (session_store=redis, redis+sentinel://, one "
    "replica, three sentinels) mid-run with SIGKILL: the sentinels fail over, 503 "
    "store_unavailable meanwhile, running streams finish, outcomes written on the new primary",
    REDIS_MOCK_SERVICE,
    **FAULT_RUN,
    options={**FAULT_MIX, "fault_kind": "redis-kill", "fault_down_sec": STORE_DOWN_SEC},
    redis_shape="sentinel",
)
REDIS_SHAPES = ("single", "cluster", "sentinel")


def redis_shape_of(name: str, requested: str = "") -> str:
    """The Redis shape profile `name` runs on ("" for a service without the Redis store), with
    `--redis-shape requested` (which puts any service on the Redis store). A combination that
    cannot work raises ValueError."""
    profile = PROFILES[name]
    on_redis = profile.service.get("session_store") == "redis"
    if not requested:
        return profile.redis_shape if on_redis else ""
    if requested not in REDIS_SHAPES:
        raise ValueError(f"--redis-shape {requested}: one of {', '.join(REDIS_SHAPES)}")
    kind = str(profile.options.get("fault_kind", "")) if profile.options.get("fault_at") else ""
    if profile.redis_shape != "single" and requested != profile.redis_shape:
        raise ValueError(f"profile {name} runs on Redis {profile.redis_shape}, not {requested}")
    if kind == "state-actor":
        raise ValueError(f"profile {name} tests the Ray actor store, not Redis")
    if kind.startswith("redis-") and requested == "cluster":
        raise ValueError(f"profile {name}: no Redis fault injector for a cluster (its nodes)")
    return requested


def service_of(name: str, shape: str) -> dict[str, Any]:
    """Profile `name`'s service, on the Redis store when it runs on a Redis shape."""
    service = PROFILES[name].service
    return {**service, "session_store": "redis"} if shape else service


@contextlib.contextmanager
def redis_store(shape: str) -> Iterator[tuple[str, Path | str]]:
    """Start the Redis of `shape` on loopback (durable: append-only file, fsync always); yields
    its URL for CHATSTREAM_REDIS_URL and the directory the fault injector acts on ("" for a
    cluster). Stopped at the end, each server by its own pid."""
    from tests.redis_server import RedisClusterServers, SentinelSet, start_redis

    if shape == "cluster":
        with RedisClusterServers(masters=3, durable=True) as cluster:
            print(f"Redis Cluster, 3 primaries: {cluster.url}", flush=True)
            yield cluster.url, ""
    elif shape == "sentinel":
        with (
            SentinelSet(replicas=1, sentinels=3, durable=True) as sentinels,
            tempfile.TemporaryDirectory(prefix="chatstream-sentinel-") as directory,
        ):
            sentinels.describe(Path(directory))
            print(f"Redis behind Sentinel: {sentinels.url} (fault dir {directory})", flush=True)
            yield sentinels.url, directory
    else:
        with contextlib.closing(start_redis(durable=True)) as redis:
            print(f"redis-server on {redis.url} (directory {redis.dir})", flush=True)
            yield redis.url, redis.dir


def locust_command(
    name: str,
    profile: Profile,
    url: str,
    reports_dir: Path,
    ray_address: str = "",
    extra: list[str] | None = None,
    redis_dir: str | Path = "",
    strict_quits: bool = True,
) -> list[str]:
    """The Locust command line of one profile (exactly what a user could type).

    `strict_quits`: the service is the profile's own (a close cannot race its answers); not so
    for a service someone else started (`--url`)."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "-u",
        str(profile.users),
        "-r",
        str(profile.spawn_rate),
        "-t",
        profile.run_time,
        "--stop-timeout",
        "60",
        "--only-summary",
        "--csv",
        str(reports_dir / name),
        "--html",
        str(reports_dir / f"{name}.html"),
        "--accounting-report",
        str(reports_dir / f"{name}-accounting.json"),
    ]
    options = dict(profile.options, strict_quits=strict_quits)
    if ray_address:
        options["fault_ray_address"] = ray_address
    if redis_dir and str(profile.options.get("fault_kind", "")).startswith("redis-"):
        options["fault_redis_dir"] = str(redis_dir)
    return command + as_argv(options) + list(extra or [])


def run_locust(command: list[str]) -> int:
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    print(f"locust exited with {code} after {time.monotonic() - started:.0f}s", flush=True)
    return code


def needs_ray_address(profile: Profile) -> bool:
    return bool(profile.options.get("fault_at")) and not str(
        profile.options.get("fault_kind", "")
    ).startswith("redis-")


def run_profiles(
    names: list[str],
    url: str = "",
    ray_address: str = "",
    reports_dir: Path = LOADTEST_DIR / "reports",
    extra: list[str] | None = None,
    redis_dir: str | Path = "",
    redis_shape: str = "",
) -> int:
    """Run the profiles in order; consecutive ones with the same service (and Redis shape)
    share one start."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    codes: list[int] = []
    groups: list[tuple[dict[str, Any], str, list[str]]] = []
    for name in names:
        shape = redis_shape_of(name, redis_shape)
        service = service_of(name, shape)
        if groups and groups[-1][:2] == (service, shape):
            groups[-1][2].append(name)
        else:
            groups.append((service, shape, [name]))

    for service, shape, group in groups:
        if url:
            for name in group:
                profile = PROFILES[name]
                command = locust_command(
                    name, profile, url, reports_dir, ray_address, extra, redis_dir, False
                )
                codes.append(run_locust(command))
            continue
        codes += run_group(group, service, reports_dir, extra, shape)
    return max(codes, default=0)


def run_group(
    group: list[str],
    service: dict[str, Any],
    reports_dir: Path,
    extra: list[str] | None,
    redis_shape: str = "",
) -> list[int]:
    """Start the service (and its redis-server when it needs one), run the profiles, stop."""
    from loadtest.fault import gcs_address_for_port
    from serve_app.config import ADMIN_TOKEN_ENV, REDIS_URL_ENV
    from serve_app.local_server import LocalServe

    with contextlib.ExitStack() as stack:
        # The operator endpoints need the admin token: the service and Locust (a child process
        # that inherits this environment) share one, a fresh one unless it is already set.
        env = {ADMIN_TOKEN_ENV: os.environ.setdefault(ADMIN_TOKEN_ENV, secrets.token_urlsafe(24))}
        # The group shares one service: its environment (API keys) is the first profile's;
        # Locust, a child process, reads the keys from it too.
        env.update(PROFILES[group[0]].service_env)
        os.environ.update(PROFILES[group[0]].service_env)
        redis_dir: Path | str = ""
        if service.get("session_store") == "redis":
            env[REDIS_URL_ENV], redis_dir = stack.enter_context(
                redis_store(redis_shape or "single")
            )
        log_path = reports_dir / f"serve-{'-'.join(group)}.log"
        print(f"starting ChatStream on loopback with {service} (log: {log_path})", flush=True)
        started = time.monotonic()
        server = stack.enter_context(LocalServe(service, log_path=log_path, env=env))
        print(f"service ready at {server.url} in {time.monotonic() - started:.0f}s", flush=True)
        address = ""
        if any(needs_ray_address(PROFILES[name]) for name in group):
            address = gcs_address_for_port(server.port)
            print(f"the service's Ray cluster: {address or 'NOT FOUND'}", flush=True)
        return [
            run_locust(
                locust_command(
                    name, PROFILES[name], server.url, reports_dir, address, extra, redis_dir
                )
            )
            for name in group
        ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="profiles: " + "; ".join(f"{k}: {p.description}" for k, p in PROFILES.items()),
    )
    parser.add_argument("--profile", nargs="+", choices=sorted(PROFILES), default=["ci"])
    parser.add_argument("--url", default="", help="test this running service instead")
    parser.add_argument(
        "--ray-address", default="", help="with --url: the service's Ray GCS address (fault)"
    )
    parser.add_argument(
        "--redis-dir",
        default="",
        help="with --url: the directory of the service's redis-server (redis.conf, redis.pid), "
        "for the redis fault profiles",
    )
    parser.add_argument("--reports-dir", type=Path, default=LOADTEST_DIR / "reports")
    parser.add_argument(
        "--redis-shape",
        choices=REDIS_SHAPES,
        default="",
        help="run on the Redis store in this shape (a service without it is switched to "
        "session_store=redis): one server, a 3-primary cluster, or a primary with a replica "
        "behind three sentinels; default: each profile's own",
    )
    args = parser.parse_args(argv)
    try:
        for name in args.profile:
            redis_shape_of(name, args.redis_shape)
    except ValueError as exc:
        parser.error(str(exc))
    return run_profiles(
        args.profile,
        args.url,
        args.ray_address,
        args.reports_dir,
        extra,
        args.redis_dir,
        args.redis_shape,
    )


if __name__ == "__main__":
    sys.exit(main())
