"""The model replica count a Ray cluster starts with, when Serve autoscales (pure).

With a fixed count (`spec.replicas`) the rendered count is the spec's. With autoscaling the
count is Serve's to choose, and two rendered fields only set where it starts:
- the worker group's `replicas`: the pods a new Ray cluster starts with (KubeRay leaves a
  running cluster's count to Ray's autoscaler);
- the model deployment's `autoscaling_config.initial_replicas`: the replicas Serve starts with,
  and the target it resets to whenever the deployment's config changes (Serve's
  `AutoscalingState.register`).
Both take the current count, so that an upgrade's new cluster starts with the capacity that
serves now (KubeRay moves all traffic to it once its application runs), and a config change in
place does not drop the deployment to `minReplicas`. The current count is what KubeRay reports
for the active cluster: the worker pods Ray's autoscaler wants, one per model replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from .render import MODEL_DEPLOYMENT_NAME


def current_count(rayservice: Mapping[str, Any] | None) -> int | None:
    """The model replicas the active Ray cluster runs or is starting (None: not reported)."""
    if not rayservice:
        return None
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    cluster = active.get("rayClusterStatus") or {}
    for field in ("desiredWorkerReplicas", "readyWorkerReplicas"):
        value = cluster.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def rendered_start(rayservice: Mapping[str, Any] | None) -> int | None:
    """The starting count the RayService holds now (its model deployment's initial_replicas)."""
    try:
        config = yaml.safe_load(((rayservice or {}).get("spec") or {}).get("serveConfigV2") or "")
        for app in (config or {}).get("applications") or []:
            for deployment in app.get("deployments") or []:
                if deployment.get("name") == MODEL_DEPLOYMENT_NAME:
                    start = (deployment.get("autoscaling_config") or {}).get("initial_replicas")
                    return start if isinstance(start, int) else None
    except (yaml.YAMLError, AttributeError, TypeError):
        return None
    return None
