"""The PodDisruptionBudget rendered with each RayService (pure).

A node drain (`kubectl drain`, a cluster autoscaler scale-down, a node upgrade) evicts pods
through the eviction API, which honours PodDisruptionBudgets. The budget covers the model pods
(label `chatstream.dev/component: model`): at most one is evicted at a time, so with two or more
model replicas the Serve application keeps serving while a node drains, and each evicted pod
gets terminationGracePeriodSeconds from the drain bound (drain.py). The head is not covered: a
budget that never lets the single head go would block every drain of its node. Without GCS
fault tolerance a drained head takes the Ray cluster (and every stream) with it and KubeRay
starts it again; with `spec.gcsFaultTolerance` the workers and their replicas survive while the
head restarts.
"""

from __future__ import annotations

from typing import Any

from . import COMPONENT_LABEL, NAME_LABEL
from .render import labels


def disruption_budget_name(name: str) -> str:
    return f"{name}-model"


def render_disruption_budget(name: str) -> dict[str, Any]:
    """The desired PodDisruptionBudget for ChatStream `name`, without namespace and owner."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": disruption_budget_name(name), "labels": labels(name)},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {NAME_LABEL: name, COMPONENT_LABEL: "model"}},
        },
    }
