"""Pure status logic: a RayService's status -> the ChatStream's status fields and conditions.

Conditions:
- Ready: the Serve application serves: RUNNING with the model deployment HEALTHY, a scale
  under way (the model deployment UPSCALING / DOWNSCALING while the other replicas serve), or
  a rebuild of an application that served (DEPLOYING: Serve replaces replicas in rolling
  fashion). Every condition carries the observedGeneration it describes.
- Progressing: a deployment, scale or cluster upgrade is under way. Its reason names the phase
  (`kubectl get chs` shows it): Creating, Deploying, Updating, Upgrading (a new Ray cluster),
  ScalingUp, ScalingDown (Serve drains the model replicas it removes), ReleasingPods (Serve is
  done; Ray's autoscaler removes the idle worker pods), then Stable.
- InvalidSpec: the spec breaks a rule the schema cannot express (set by the reconcile handler;
  the RayService mirror keeps it as it is).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .render import DEFAULT_APP_NAME, MODEL_DEPLOYMENT_NAME, WORKER_GROUP, endpoint, model_selector

# Model deployment states in which the application serves (a scale keeps the other replicas).
SERVING_MODEL_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")

READY = "Ready"
PROGRESSING = "Progressing"
INVALID_SPEC = "InvalidSpec"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        cond = dict(cond)
        if cond.get("type") == type_:
            found = True
            if cond.get("status") != value:
                cond["lastTransitionTime"] = now
            cond.update(status=value, reason=reason, message=message)
            if generation is not None:
                cond["observedGeneration"] = generation
        result.append(cond)
    if not found:
        cond = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        result.append(cond)
    return result


def _serve_state(rayservice: Mapping[str, Any]) -> tuple[str, str, str]:
    """(application status, model deployment status, message) of the active Ray cluster."""
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    app = (active.get("applicationStatuses") or {}).get(DEFAULT_APP_NAME) or {}
    model = (app.get("serveDeploymentStatuses") or {}).get(MODEL_DEPLOYMENT_NAME) or {}
    message = model.get("message") or app.get("message") or ""
    return app.get("status", ""), model.get("status", ""), message


def _model_override(rayservice: Mapping[str, Any]) -> dict[str, Any]:
    """The model deployment's options in the RayService's serveConfigV2 ({} if unreadable)."""
    try:
        config = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "") or {}
        apps = [a for a in config.get("applications") or [] if a.get("name") == DEFAULT_APP_NAME]
        deployments = apps[0].get("deployments") or [] if apps else []
    except (yaml.YAMLError, AttributeError):
        return {}
    return next((d for d in deployments if d.get("name") == MODEL_DEPLOYMENT_NAME), {})


def _scale_phase(rayservice: Mapping[str, Any], model_status: str) -> tuple[str, str]:
    """(reason, message) of a scale in progress, ("", "") when there is none.

    Serve goes first: it starts or drains model replicas (UPSCALING / DOWNSCALING). The pods
    follow: Ray's autoscaler adds a pod for each replica waiting for a slot, and removes a pod
    once it has been idle, i.e. after its replica drained and exited (ReleasingPods).
    """
    model = _model_override(rayservice)
    cluster_config = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    idle = (cluster_config.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    pods = (active.get("rayClusterStatus") or {}).get("desiredWorkerReplicas")
    if model_status == "DOWNSCALING":
        bound = model.get("graceful_shutdown_timeout_s")
        within = f", each within {bound:g}s" if isinstance(bound, (int, float)) else ""
        return "ScalingDown", f"Serve drains the model replicas it removes{within}"
    if model_status == "UPSCALING":
        return "ScalingUp", "Serve starts model replicas; Ray's autoscaler adds their pods"
    target = model.get("num_replicas")
    if not isinstance(target, int) or pods is None:
        return "", ""  # Serve autoscales: the pods follow its own decisions
    if pods > target:
        after = f" once idle for {idle}s" if idle is not None else " once idle"
        return (
            "ReleasingPods",
            f"Serve runs {target} model replicas; {pods - target} worker pods without one "
            f"go{after}",
        )
    if pods < target:
        return "ScalingUp", f"{pods}/{target} worker pods; Ray's autoscaler adds the rest"
    return "", ""


def _counts(rayservice: Mapping[str, Any] | None) -> tuple[int, int]:
    """(replicas, readyReplicas): one model replica per pod of the RayService's model group.

    `replicas` is what the RayService asks Serve for (`num_replicas`), so that an invalid or not
    yet applied ChatStream spec does not show up as running replicas, and idle pods waiting to
    go (ReleasingPods) do not count for the scale subresource and HPAs. When Serve autoscales,
    it is the pods Ray's autoscaler wants, which follow Serve's choice.
    """
    if rayservice is None:
        return 0, 0
    cluster_spec = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    groups = [
        g for g in cluster_spec.get("workerGroupSpecs") or [] if g.get("groupName") == WORKER_GROUP
    ]
    replicas = int(groups[0].get("replicas") or 0) if groups else 0
    active = (rayservice.get("status") or {}).get("activeServiceStatus") or {}
    cluster = active.get("rayClusterStatus") or {}
    target = _model_override(rayservice).get("num_replicas")
    if isinstance(target, int):
        replicas = target
    elif (
        cluster_spec.get("enableInTreeAutoscaling")
        and cluster.get("desiredWorkerReplicas") is not None
    ):
        replicas = int(cluster["desiredWorkerReplicas"])
    _, model_status, _ = _serve_state(rayservice)
    ready = int(cluster.get("readyWorkerReplicas") or 0)
    if model_status not in (*SERVING_MODEL_STATES, "UPDATING"):
        ready = 0
    replicas = max(replicas, 0)  # never a negative count (an unchecked spec, by hand)
    return replicas, max(0, min(ready, replicas))


def _upgrade_message(status: Mapping[str, Any]) -> str:
    """What an upgrade waits for: the new cluster's pods, which need the cluster's resources a
    second time while the old cluster serves (GPUs twice, with NewCluster)."""
    pending = status.get("pendingServiceStatus") or {}
    name = pending.get("rayClusterName")
    cluster = pending.get("rayClusterStatus") or {}
    ready, desired = cluster.get("readyWorkerReplicas"), cluster.get("desiredWorkerReplicas")
    message = f"new Ray cluster {name}"
    if isinstance(desired, int) and desired and (ready or 0) < desired:
        message += (
            f": {ready or 0}/{desired} worker pods ready; it needs the cluster's resources a "
            "second time while the old one serves (GPUs twice): pods that stay Pending mean "
            "the cluster lacks room (kubectl get pods; free capacity or use "
            "upgradeStrategy NewClusterWithIncrementalUpgrade)"
        )
    elif (pending.get("applicationStatuses") or {}).get(DEFAULT_APP_NAME):
        app = pending["applicationStatuses"][DEFAULT_APP_NAME].get("status", "").lower()
        message += f": the Serve application is {app}" if app else ""
    return message


def _head_ready(cluster: Mapping[str, Any]) -> bool:
    conditions = cluster.get("conditions") or []
    return cluster.get("state") == "ready" or any(
        c.get("type") == "HeadPodReady" and c.get("status") == "True" for c in conditions
    )


def _no_serve_status(status: Mapping[str, Any]) -> str:
    """Why there is no Serve status yet. A Ray cluster whose head runs but whose application
    KubeRay never reports is, most often, a KubeRay that cannot reach the head's dashboard: the
    NetworkPolicy admits only the control-plane peers (KubeRay in kuberay-system by default)."""
    cluster = (status.get("activeServiceStatus") or {}).get("rayClusterStatus") or {}
    if not _head_ready(cluster):
        return "no Serve status yet"
    return (
        "the Ray head runs but KubeRay reports no Serve application yet: KubeRay deploys it "
        "through the head's dashboard (port 8265), which the NetworkPolicy opens only to the "
        "control-plane peers; if KubeRay runs outside the namespace kuberay-system, allow it with "
        "the operator's --control-plane-peers (chart: networkPolicy.controlPlanePeers)"
    )


def _readiness(rayservice: Mapping[str, Any] | None) -> tuple[bool, str, str, bool, str, str]:
    """(ready, reason, message, progressing, reason, message) from the RayService."""
    if rayservice is None:
        return (
            False,
            "RayServiceMissing",
            "the RayService does not exist (yet)",
            True,
            "Creating",
            "",
        )
    app_status, model_status, message = _serve_state(rayservice)
    status = rayservice.get("status") or {}
    pending = (status.get("pendingServiceStatus") or {}).get("rayClusterName")
    upgrading = _upgrade_message(status) if pending else ""
    generation = (rayservice.get("metadata") or {}).get("generation")
    seen = status.get("observedGeneration")
    behind = generation is not None and seen is not None and seen < generation
    # A scale (Serve reports DEPLOYING for one it was told to make) keeps serving.
    scaling = app_status == "DEPLOYING" and model_status in SERVING_MODEL_STATES[1:]
    if (app_status == "RUNNING" and model_status in SERVING_MODEL_STATES) or scaling:
        if pending:
            return True, "Serving", message, True, "Upgrading", upgrading
        if behind:
            return True, "Serving", message, True, "Updating", "KubeRay has not seen the change yet"
        phase, detail = _scale_phase(rayservice, model_status)
        if phase:
            return True, "Serving", message, True, phase, detail
        return True, "Serving", message, False, "Stable", ""
    if app_status in ("DEPLOY_FAILED", "UNHEALTHY") or model_status == "UNHEALTHY":
        reason = "DeployFailed" if app_status == "DEPLOY_FAILED" else "Unhealthy"
        return False, reason, message, False, reason, message
    if not app_status:
        return False, "WaitingForRayCluster", message, True, "Creating", _no_serve_status(status)
    return False, "Deploying", message, True, "Deploying", f"application {app_status.lower()}"


def _was_ready(conditions: Sequence[Mapping[str, Any]]) -> bool:
    return any(c.get("type") == READY and c.get("status") == "True" for c in conditions)


def derive_status(
    name: str,
    namespace: str,
    rayservice: Mapping[str, Any] | None,
    conditions: Sequence[Mapping[str, Any]],
    now: str,
    generation: int | None = None,
) -> dict[str, Any]:
    """The ChatStream status fields that follow from the RayService (InvalidSpec is left alone).
    `generation`: the ChatStream generation these conditions describe (the one last acted on);
    every condition carries it as observedGeneration, as Kubernetes' conventions ask."""
    replicas, ready_replicas = _counts(rayservice)
    ready, r_reason, r_msg, progressing, p_reason, p_msg = _readiness(rayservice)
    if not ready and r_reason == "Deploying" and _was_ready(conditions):
        # Serve rebuilds the application in rolling fashion (new arguments, options): the old
        # replicas serve until new ones run, so the service stays Ready while it updates.
        ready, r_reason = True, "Serving"
        p_reason, p_msg = "Updating", "Serve replaces the replicas; the old ones serve meanwhile"
    if not r_msg:
        r_msg = f"{ready_replicas}/{replicas} model replicas ready"
    conds = set_condition(conditions, READY, ready, r_reason, r_msg, now, generation)
    conds = set_condition(conds, PROGRESSING, progressing, p_reason, p_msg, now, generation)
    return {
        "replicas": replicas,
        "readyReplicas": ready_replicas,
        "selector": model_selector(name),
        "endpoint": endpoint(name, namespace),
        "rayServiceName": name,
        "conditions": conds,
    }


def status_changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level status fields whose values differ (conditions compared whole)."""
    return {key: value for key, value in desired.items() if current.get(key) != value}
