"""Drain bounds: how long a scale-down or an upgrade may take, derived from the longest answer.

One number drives them all, the longest answer the service allows:

    answer_s = drain.firstTokenSec + generation.maxNewTokens * drain.timePerTokenSec

- A model replica that Serve removes (scale-down, autoscaling, a restart for new options)
  finishes the streams it holds: its `graceful_shutdown_timeout_s` is `answer_s`.
- An ingress replica also holds requests that still wait for a model slot: a wait for one
  running answer, then its own, so `2 * answer_s`.
- Serve checks a draining replica's ongoing requests every `graceful_shutdown_wait_loop_s`;
  a drained replica exits within one period, so the period is a twentieth of the bound
  (0.1 s to 2 s, Serve's default being 2 s).
- After an upgrade, KubeRay keeps the old Ray cluster for `rayClusterDeletionDelaySeconds`:
  the ingress bound plus SWITCH_SLACK_SEC for requests that reach the old cluster while the
  Service's endpoints change.
- A pod that Kubernetes stops (a node drain, an eviction) gets its replicas' bound plus
  POD_STOP_SLACK_SEC, rounded up to a minute, as terminationGracePeriodSeconds: the model pods
  `answer_s`, the head (which holds the ingress replicas) `2 * answer_s`.
- A model pod being stopped first drains its Ray node (pods.drain_hook, a preStop hook): Serve
  moves the replica, which finishes its streams, by `worker_drain_deadline_s` (the grace period
  less POD_STOP_SLACK_SEC); since `_grace` adds the slack to the answer bound, a replica that
  Serve stops only at the deadline's last moment still has its whole bound.
- A worker pod whose model replica is gone is removed by Ray's autoscaler once it has been
  idle for `drain.podIdleTimeoutSec`; a pod still holding a draining replica is never idle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from chatstream_defaults import answer_seconds, wait_loop_seconds

from .spec import with_defaults

SWITCH_SLACK_SEC = 30
# Beyond the drain bound, a pod being stopped (a node drain, an eviction) gets this long for
# Ray's own shutdown.
POD_STOP_SLACK_SEC = 15


class DrainBounds(NamedTuple):
    answer_s: float  # the longest answer: model replicas' graceful_shutdown_timeout_s
    ingress_s: float  # ingress replicas' graceful_shutdown_timeout_s
    wait_loop_s: float  # graceful_shutdown_wait_loop_s of both deployments
    cluster_deletion_delay_s: int  # KubeRay's rayClusterDeletionDelaySeconds
    pod_idle_timeout_s: int  # Ray autoscaler's idleTimeoutSeconds for worker pods
    worker_grace_s: int  # model pods' terminationGracePeriodSeconds
    head_grace_s: int  # the head pod's (it holds the ingress replicas)
    # By when a model pod being stopped must have no replica left (its preStop drain's deadline):
    # its grace period less POD_STOP_SLACK_SEC for Ray's own shutdown after the hook.
    worker_drain_deadline_s: int


def _grace(bound_s: float) -> int:
    """terminationGracePeriodSeconds for a drain bound: the bound plus POD_STOP_SLACK_SEC,
    rounded up to a whole minute. It is part of the pod template, which KubeRay hashes: a change
    starts a new Ray cluster, so small changes of the bound should leave it as it is."""
    return math.ceil((bound_s + POD_STOP_SLACK_SEC) / 60) * 60


def drain_bounds(spec: Mapping[str, Any]) -> DrainBounds:
    s = with_defaults(spec)
    drain = s["drain"]
    # The formula serve_app's builder uses for `serve run` too (one definition).
    answer = answer_seconds(
        s["generation"]["maxNewTokens"], drain["firstTokenSec"], drain["timePerTokenSec"]
    )
    ingress = round(2 * answer, 3)
    wait_loop = wait_loop_seconds(answer)
    return DrainBounds(
        answer_s=answer,
        ingress_s=ingress,
        wait_loop_s=wait_loop,
        cluster_deletion_delay_s=math.ceil(ingress) + SWITCH_SLACK_SEC,
        pod_idle_timeout_s=int(drain["podIdleTimeoutSec"]),
        worker_grace_s=_grace(answer),
        head_grace_s=_grace(ingress),
        worker_drain_deadline_s=_grace(answer) - POD_STOP_SLACK_SEC,
    )
