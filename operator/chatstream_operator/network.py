"""The NetworkPolicy rendered with each RayService (pure).

The Ray head serves the dashboard and Jobs API (8265), the GCS (6379) and the Ray client (10001):
whoever reaches them can run code in the cluster and read every session (Ray's security guidance:
never expose them to untrusted networks). The policy selects every pod of the ChatStream's Ray
cluster (head and workers carry NAME_LABEL) and admits:

- the Serve port (8000) from anywhere: that is the chat service;
- every port from the Ray cluster's own pods (Ray's processes talk to each other on many ports);
- every port from the control-plane peers: the KubeRay operator, which deploys the Serve config
  through the dashboard and polls it (operator flag --control-plane-peer, chart value
  networkPolicy.controlPlanePeers);
- the metrics port (8080) from the metrics peers, e.g. Prometheus (--metrics-peer), if any.

Only ingress is restricted: the pods still reach Redis, the model hub and so on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from . import NAME_LABEL
from .render import SERVE_PORT, labels

METRICS_PORT = 8080

# KubeRay's operator as its Helm chart installs it (README: namespace kuberay-system).
DEFAULT_CONTROL_PLANE_PEERS: list[dict[str, Any]] = [
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
]


def network_policy_name(name: str) -> str:
    return f"{name}-ray"


def render_network_policy(
    name: str,
    control_plane_peers: Sequence[Mapping[str, Any]] = tuple(DEFAULT_CONTROL_PLANE_PEERS),
    metrics_peers: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The desired NetworkPolicy of ChatStream `name`, without namespace and owner (see adopt)."""
    cluster_pods = {"podSelector": {"matchLabels": {NAME_LABEL: name}}}
    rules: list[dict[str, Any]] = [
        {"ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
        {"from": [copy.deepcopy(cluster_pods)]},
    ]
    if control_plane_peers:
        rules.append({"from": [copy.deepcopy(dict(p)) for p in control_plane_peers]})
    if metrics_peers:
        rules.append(
            {
                "from": [copy.deepcopy(dict(p)) for p in metrics_peers],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(name), "labels": labels(name)},
        "spec": {
            "podSelector": copy.deepcopy(cluster_pods["podSelector"]),
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }
