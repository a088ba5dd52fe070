"""Where the CPU goes while a benchmark runs: per process of one server's process tree (by role)
and per core of the machine, as differences between two snapshots.

CPU seconds per streamed token are far less sensitive to other load on the machine than wall
times, so they are what the benchmarks compare between servers and settings:

    tree = ProcessTree(server_pid)
    before = tree.snapshot()
    ...  # the round
    used = tree.snapshot() - before          # a CpuUse
    used.ms_per_token(tokens)                # {"proxy": 1.2, "ingress": 2.3, ...}

Roles (the first pattern a process's command line matches; everything else in the tree is
`ray`: idle Ray workers, `serve run` itself, helpers):

  proxy          Ray Serve's HTTP proxy actor
  haproxy        Ray Serve's HAProxy ingress (in high-throughput mode)
  ingress        ChatStream's ingress replica (FastAPI)
  replica        the model replica (with engine=vllm: vLLM's AsyncLLM front, detokenizing)
  engine_core    vLLM's EngineCore process (scheduler, busy loop)
  engine_worker  vLLM's model worker (the compute; pinned to its cores by vLLM on a CPU)
  api_server     vLLM's own OpenAI server process (the peer's front end)
  ray_*          Ray's daemons: the Serve controller, GCS, raylet, dashboard and agents, and
                 ChatStream's `ray` state store actor

`client` is this process (the benchmark's HTTP clients), `outside` the rest of the machine
(anything not in the tree: other users of the box). Per core: busy seconds from /proc/stat.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import psutil

ROLE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine_worker", ("VLLM::Worker",)),
    ("engine_core", ("VLLM::EngineCore",)),
    ("api_server", ("VLLM::APIServer", "vllm.entrypoints.openai.api_server")),
    ("proxy", ("ray::ProxyActor",)),
    ("haproxy", ("haproxy",)),  # Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY)
    ("ingress", ("ChatStreamIngress",)),
    ("replica", ("ChatModel",)),
    ("ray_controller", ("ray::ServeController",)),
    ("ray_store", ("ray::SharedState",)),  # ChatStream's `ray` state store actor
    ("ray_gcs", ("gcs_server",)),
    ("ray_raylet", ("raylet/raylet",)),
    ("ray_dashboard", ("dashboard", "DashboardAgent", "RuntimeEnvAgent", "monitor.py")),
)
ROLES = tuple(role for role, _ in ROLE_PATTERNS) + ("ray", "client", "outside")
# Ray's own processes and the state store: the roles whose names start with `ray`.
RAY_ROLES = tuple(role for role in ROLES if role.startswith("ray"))
# The processes that carry a request between the client and the engine: ChatStream's front end
# (proxy + ingress + model replica) and, for vLLM's own server, its API server process.
FRONT_END = ("proxy", "haproxy", "ingress", "replica", "api_server")


def role_of(cmdline: str) -> str:
    """The role of a process of the tree from its command line (see the module doc)."""
    for role, needles in ROLE_PATTERNS:
        if any(needle in cmdline for needle in needles):
            return role
    return "ray"


def busy_seconds(times: psutil._common.scputimes) -> float:  # type: ignore[name-defined]
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class CpuUse:
    """CPU seconds by role and busy seconds per core over `wall` seconds (a difference)."""

    wall: float
    roles: dict[str, float] = field(default_factory=dict)
    cores: list[float] = field(default_factory=list)

    def __sub__(self, before: CpuUse) -> CpuUse:
        return CpuUse(
            self.wall - before.wall,
            {r: self.roles.get(r, 0.0) - before.roles.get(r, 0.0) for r in ROLES},
            [a - b for a, b in zip(self.cores, before.cores, strict=True)],
        )

    def __add__(self, other: CpuUse) -> CpuUse:
        if not self.cores:
            return other
        return CpuUse(
            self.wall + other.wall,
            {r: self.roles.get(r, 0.0) + other.roles.get(r, 0.0) for r in ROLES},
            [a + b for a, b in zip(self.cores, other.cores, strict=True)],
        )

    def ms_per_token(self, tokens: int) -> dict[str, float]:
        """CPU ms per streamed token by role, plus `front_end` (the FRONT_END roles)."""
        per = {r: 1000 * s / max(1, tokens) for r, s in self.roles.items()}
        per["front_end"] = sum(per.get(r, 0.0) for r in FRONT_END)
        per["ray_all"] = sum(per.get(r, 0.0) for r in RAY_ROLES)
        return per

    def core_load(self) -> list[float]:
        """Each core's busy share of the wall time (0..1)."""
        return [busy / self.wall if self.wall > 0 else 0.0 for busy in self.cores]


class ProcessTree:
    """Snapshots of the CPU times of `root_pid` and its descendants (found again at every
    snapshot, so processes started later, like vLLM's, are counted), of this process, and of
    the machine's cores."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self.me = psutil.Process(os.getpid())
        self._roles: dict[int, str] = {}
        # CPU seconds of exited processes, by role, so that a difference never goes negative.
        self._gone: dict[str, float] = {}
        self._last: dict[int, float] = {}

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid not in self._roles:
            self._roles[proc.pid] = role_of(" ".join(proc.cmdline()))
        return self._roles[proc.pid]

    def snapshot(self) -> CpuUse:
        roles = dict.fromkeys(ROLES, 0.0)
        seen: dict[int, float] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                seen[proc.pid] = t.user + t.system
                roles[self._role(proc)] += seen[proc.pid]
        for pid, last in self._last.items():
            if pid not in seen and pid in self._roles:
                self._gone[self._roles[pid]] = self._gone.get(self._roles[pid], 0.0) + last
        self._last = seen
        for role, seconds in self._gone.items():
            roles[role] += seconds
        t = self.me.cpu_times()
        roles["client"] = t.user + t.system
        cores = [busy_seconds(c) for c in psutil.cpu_times(percpu=True)]
        roles["outside"] = sum(cores) - sum(roles.values())
        return CpuUse(time.perf_counter(), roles, cores)


def summary(use: CpuUse, tokens: int) -> dict[str, float]:
    """A row's CPU columns: ms per token by role (`cpu_ms_<role>`), each core's load, and the
    cores the rest of the machine took meanwhile (`cores_outside`)."""
    out = {f"cpu_ms_{role}": ms for role, ms in use.ms_per_token(tokens).items()}
    out.update({f"core{i}_busy": load for i, load in enumerate(use.core_load())})
    out["cores_outside"] = use.roles.get("outside", 0.0) / use.wall if use.wall > 0 else 0.0
    return out


def format_split(extra: dict[str, float]) -> str:
    """`proxy 1.2 + ingress 2.3 + ...` for a row's non-zero front-end roles."""
    parts = [
        f"{role} {extra[f'cpu_ms_{role}']:.2f}"
        for role in FRONT_END
        if extra.get(f"cpu_ms_{role}", 0.0) >= 0.005
    ]
    return " + ".join(parts) or "—"
