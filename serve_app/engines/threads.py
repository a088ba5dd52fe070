"""How many threads a model replica computes with, decided by the replica itself.

Ray starts an actor with `OMP_NUM_THREADS` set to its `num_cpus` (1 by default), and torch reads
that once. The replica does not rely on what it inherits: it sets torch's intra-op threads
explicitly, from `torch_threads` when given, else from its CPU allotment:

- `num_cpus` set (a cluster: the operator sets it, and the pod's CPU limit, per replica): the
  CPUs Ray assigned to the replica, rounded, at least 1;
- `num_cpus` left empty (a local `serve run`): every core this process may use, shared by the
  model replicas the box runs. On one machine the model is the only part that computes; Serve's
  proxy and the ingress need a fraction of a core (measured in the README's Performance
  section), so the model replicas get the box.

Never more than the cores the process may use (CPU affinity and the cgroup's CPU quota).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from serve_app.config import ChatStreamConfig


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def ray_cpu_allotment() -> float | None:
    """CPUs Ray assigned to this actor, or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # no Ray, or not inside a task/actor
        return None


def torch_threads(config: ChatStreamConfig, allotment: float | None = None) -> int:
    """The intra-op thread count for a model replica with `config` (see the module doc)."""
    cores = usable_cores()
    if config.torch_threads:
        return config.torch_threads
    if config.num_cpus is None:  # more threads than cores in all would only slow each other
        return max(1, cores // max(1, local_model_replicas(config)))
    cpus = allotment if allotment is not None else config.num_cpus
    return max(1, min(cores, round(cpus)))


def local_model_replicas(config: ChatStreamConfig) -> int:
    """Model replicas a local run may start at once: `max_replicas` when autoscaling."""
    return config.max_replicas if config.autoscaling else config.num_replicas


# Below this share of a core per model replica a local run refuses to start: its replicas would
# only take turns on the cores.
MIN_LOCAL_REPLICA_CPUS = 0.25


def local_model_cpus(config: ChatStreamConfig, cores: int) -> float:
    """CPUs to reserve per model replica when `num_cpus` is empty (a local `serve run`): one,
    or the cores left by the ingress replicas shared among the model replicas, so that all of
    them fit on this machine. ValueError, naming the knobs, when they cannot."""
    replicas = local_model_replicas(config)
    left = cores - config.ingress_replicas * config.ingress_num_cpus
    if replicas == 0:
        return 1.0
    share = math.floor(min(1.0, left / replicas) * 100) / 100  # Ray counts CPUs in 1/10,000
    if share < MIN_LOCAL_REPLICA_CPUS:
        raise ValueError(
            f"{replicas} model replicas and {config.ingress_replicas} ingress replica(s) of "
            f"ingress_num_cpus={config.ingress_num_cpus} do not fit the {cores} cores of this "
            f"machine (each model replica needs at least {MIN_LOCAL_REPLICA_CPUS} CPU): lower "
            "num_replicas (or max_replicas), or set num_cpus (CPUs per model replica) yourself"
        )
    return share
