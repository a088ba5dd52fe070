"""Pure rendering: a ChatStream spec -> the desired KubeRay RayService (ray.io/v1).

No API calls here. The handler adds ownership (`kopf.adopt`) and applies the result.

Layout of what is rendered:
- `serveConfigV2`: one Serve application running `serve_app:app` with the spec mapped onto the
  application's arguments (names of serve_app/config.py's ChatStreamConfig), and per-deployment
  overrides: the model deployment's replicas / autoscaling, concurrency limits and Ray
  resources, and both deployments' drain bounds (drain.py). Replica counts are never in the
  arguments: Serve rebuilds the whole application (every replica of every deployment) when the
  arguments change, but applies a changed `num_replicas` / `autoscaling_config` in place.
- a CPU head group: Serve's controller, the HTTP proxy and the ingress replicas run there.
- one worker group "model": one pod per model replica. Each worker advertises one unit of the
  custom Ray resource MODEL_SLOT and each model replica asks for one, so the worker count is the
  model replica count and model replicas never land on the head. Ray's autoscaler (KubeRay's
  in-tree autoscaling, always on) sizes the group: it adds a pod for a model replica that
  waits for a slot, and removes a pod only once it is idle, i.e. after Serve's replica on it
  has drained and exited. Pods follow Serve, never the other way round.
- KubeRay's upgrade strategy `NewCluster`: a change of the Ray cluster's spec (image, model
  pods' resources, ...) starts a new cluster, switches traffic when it serves, and deletes the
  old one after the drain bound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

import chatstream_defaults as shared

from . import (
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    OPERATOR_NAME,
    RAY_GROUP,
    RAY_VERSION,
)
from .drain import drain_bounds
from .pods import DEFAULT_GPU_RESOURCE, container_security_context, decorate, drain_hook
from .spec import clamped, desired_replicas, is_autoscaling, tensor_parallel_size, with_defaults

# Copies of serve_app/config.py's constants: the operator image does not ship serve_app, and a
# unit test asserts these stay equal to the originals.
APP_IMPORT_PATH = "serve_app:app"
DEFAULT_APP_NAME = "chatstream"
MODEL_DEPLOYMENT_NAME = "ChatModel"
INGRESS_DEPLOYMENT_NAME = "ChatStreamIngress"

# spec.autoscaling's optional timing -> Serve's autoscaling_config (Serve's defaults if unset).
AUTOSCALING_DELAYS = {
    "upscaleDelaySec": "upscale_delay_s",
    "downscaleDelaySec": "downscale_delay_s",
    "lookBackPeriodSec": "look_back_period_s",
}
MODEL_SLOT = "chatstream_model"
# Offered by the head only, and asked for by each ingress replica, so that no ingress replica
# lands on a model pod: one there would keep the pod (and its GPU) from ever being idle and
# released. The head offers more than any valid spec uses (ingress.replicas <= head.cpus <= 256).
HEAD_SLOT = "chatstream_head"
HEAD_SLOTS = 1000
SERVE_PORT = 8000
WORKER_GROUP = "model"
# The worker group's maxReplicas. KubeRay never copies a changed min/maxReplicas of a RayService
# into its running RayCluster, so a bound derived from the spec would go stale at the first
# scale-up past it. No ceiling (KubeRay's own default) instead: the pods never outnumber the
# model replicas, because the autoscaler adds a pod only for a replica that waits for a slot.
WORKER_POD_CEILING = 2**31 - 1
# KubeRay's zero-downtime upgrade by default: a new Ray cluster, traffic switched once it serves
# (spec.upgradeStrategy; NewClusterWithIncrementalUpgrade shifts traffic step by step).
UPGRADE_STRATEGY = "NewCluster"


def upgrade_strategy(s: Mapping[str, Any]) -> dict[str, Any]:
    """KubeRay's upgradeStrategy for the spec's (with defaults)."""
    upgrade = s["upgradeStrategy"]
    strategy: dict[str, Any] = {"type": upgrade.get("type") or UPGRADE_STRATEGY}
    if strategy["type"] != UPGRADE_STRATEGY and upgrade.get("clusterUpgradeOptions"):
        strategy["clusterUpgradeOptions"] = dict(upgrade["clusterUpgradeOptions"])
    return strategy


def serve_service_name(name: str) -> str:
    """KubeRay names the Service in front of Serve's proxies `<rayservice>-serve-svc`."""
    return f"{name}-serve-svc"


def endpoint(name: str, namespace: str) -> str:
    return f"http://{serve_service_name(name)}.{namespace}.svc:{SERVE_PORT}"


def model_selector(name: str) -> str:
    """Label selector of the model (worker) pods, for the scale subresource."""
    return f"{NAME_LABEL}={name},{COMPONENT_LABEL}=model"


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "chatstream",
        "app.kubernetes.io/instance": name,
        MANAGED_BY_LABEL: OPERATOR_NAME,
        NAME_LABEL: name,
    }


def serve_args(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve application's `args`: flat ChatStreamConfig keys, every one set explicitly."""
    s = with_defaults(spec)
    model, vllm, mock, gen, res, sess = (
        s["model"],
        s["vllm"],
        s["mock"],
        s["generation"],
        s["resources"],
        s["session"],
    )
    args: dict[str, Any] = {
        "engine": s["engine"],
        "model": model["source"],
        "gguf_file": model["ggufFile"],
        "tokenizer": model["tokenizer"],
        "revision": model["revision"],
        "dtype": model["dtype"],
        "quantization": model["quantization"],
        "device": model["device"],
        "max_context_tokens": model["maxContextTokens"],
        "system_prompt": model["systemPrompt"],
        "gpu_memory_utilization": vllm["gpuMemoryUtilization"],
        "tensor_parallel_size": vllm["tensorParallelSize"],
        # None (unset) lets the engine choose: eager on a CPU, CUDA graphs on a GPU.
        "enforce_eager": vllm.get("enforceEager"),
        "cpu_kv_cache_gib": vllm["cpuKvCacheGib"],
        "mock_mode": mock["mode"],
        "mock_initial_wait_sec": mock["initialWaitSec"],
        "mock_time_per_token_sec": mock["timePerTokenSec"],
        "mock_fail_marker": mock["failMarker"],
        "max_ongoing_requests": s["maxOngoingRequests"],
        "max_queued_requests": s["maxQueuedRequests"],
        "fair_share_weights": dict(s.get("fairShareWeights") or {}),
        "ingress_replicas": s["ingress"]["replicas"],
        "num_gpus": res["gpus"],
        "num_cpus": res["cpus"],
        "retry_after_sec": s["retryAfterSec"],
        "stream_interval_ms": s["streamIntervalMs"],
        "temperature": gen["temperature"],
        "top_k": gen["topK"],
        "top_p": gen["topP"],
        "max_new_tokens": gen["maxNewTokens"],
        "session_store": sess["store"],
        "session_cookie_name": sess["cookieName"],
        "session_ttl_sec": sess["ttlSec"],
        "session_max_turns": sess["maxTurns"],
        "cookie_secure": sess["cookieSecure"],
    }
    return args


def model_deployment(spec: Mapping[str, Any], start: int | None = None) -> dict[str, Any]:
    """Serve deployment options of the model deployment (they override the builder's).

    Every option here is one Serve applies to running replicas, except `ray_actor_options`,
    whose change restarts (drains) the model replicas; none rebuilds the application.
    `start`: the count an autoscaling deployment starts with (replicas.py); else the spec's.
    """
    s = with_defaults(spec)
    drain = drain_bounds(s)
    deployment: dict[str, Any] = {"name": MODEL_DEPLOYMENT_NAME}
    if is_autoscaling(s):
        bounds = s["autoscaling"]
        # null, as Serve's own `num_replicas: auto` does: the builder's count gives way.
        deployment["num_replicas"] = None
        deployment["autoscaling_config"] = {
            "min_replicas": bounds["minReplicas"],
            "initial_replicas": start if start is not None else desired_replicas(s),
            "max_replicas": bounds["maxReplicas"],
            "target_ongoing_requests": bounds["targetOngoingRequests"],
        }
        for field, option in AUTOSCALING_DELAYS.items():
            if bounds.get(field) is not None:
                deployment["autoscaling_config"][option] = bounds[field]
    else:
        deployment["num_replicas"] = desired_replicas(s)
    deployment["max_ongoing_requests"] = s["maxOngoingRequests"]
    deployment["max_queued_requests"] = s["maxQueuedRequests"]
    deployment["ray_actor_options"] = {
        "num_gpus": s["resources"]["gpus"],
        "num_cpus": s["resources"]["cpus"],
        "resources": {MODEL_SLOT: 1},
    }
    size = tensor_parallel_size(s)
    if size > 1:
        # vLLM starts one Ray worker per GPU inside the replica's placement group; Serve puts
        # the replica itself in bundle 0, so it holds no GPU of its own. STRICT_PACK: all
        # bundles on one node, the replica's model pod (its MODEL_SLOT is in bundle 0).
        deployment["ray_actor_options"]["num_gpus"] = 0
        first = {"CPU": s["resources"]["cpus"], "GPU": 1, MODEL_SLOT: 1}
        deployment["placement_group_bundles"] = [first] + [{"GPU": 1}] * (size - 1)
        deployment["placement_group_strategy"] = "STRICT_PACK"
    deployment["graceful_shutdown_timeout_s"] = drain.answer_s
    deployment["graceful_shutdown_wait_loop_s"] = drain.wait_loop_s
    return deployment


def ingress_deployment(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Serve deployment options of the ingress: its drain bounds (applied without a restart),
    and its place: the head pod (HEAD_SLOT)."""
    drain = drain_bounds(spec)
    return {
        "name": INGRESS_DEPLOYMENT_NAME,
        "ray_actor_options": {
            "num_cpus": shared.INGRESS_NUM_CPUS,
            "resources": {HEAD_SLOT: 1},
        },
        "graceful_shutdown_timeout_s": drain.ingress_s,
        "graceful_shutdown_wait_loop_s": drain.wait_loop_s,
    }


def serve_config(spec: Mapping[str, Any], start: int | None = None) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) that goes, as YAML, into spec.serveConfigV2."""
    return {
        "applications": [
            {
                "name": DEFAULT_APP_NAME,
                "import_path": APP_IMPORT_PATH,
                "route_prefix": "/",
                "args": serve_args(spec),
                "deployments": [model_deployment(spec, start), ingress_deployment(spec)],
            }
        ]
    }


def _cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _ray_resources(resources: Mapping[str, int]) -> str:
    """A rayStartParams `resources` value: spliced into a shell command line, hence quoted JSON."""
    return '"' + json.dumps(dict(resources)).replace('"', '\\"') + '"'


def _head_group(name: str, s: Mapping[str, Any]) -> dict[str, Any]:
    head = s["head"]
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-head",
                "image": s["image"],
                "imagePullPolicy": s["imagePullPolicy"],
                "ports": [
                    {"name": "gcs-server", "containerPort": 6379},
                    {"name": "dashboard", "containerPort": 8265},
                    {"name": "client", "containerPort": 10001},
                    {"name": "serve", "containerPort": SERVE_PORT},
                ],
                "resources": {
                    "requests": {"cpu": str(head["cpus"]), "memory": head["memory"]},
                    "limits": {"cpu": str(head["cpus"]), "memory": head["memory"]},
                },
            }
        ]
    }
    # The head holds the ingress replicas: it gets their drain bound before it is killed.
    grace = drain_bounds(s).head_grace_s
    decorate(pod_spec, name, s, scheduling=head, grace_s=grace, model=False)
    return {
        # The head's CPUs are for Serve's controller, proxy and the ingress replicas.
        "rayStartParams": {
            "num-cpus": str(head["cpus"]),
            "dashboard-host": "0.0.0.0",
            "resources": _ray_resources({HEAD_SLOT: HEAD_SLOTS}),
        },
        "template": {
            "metadata": {"labels": {NAME_LABEL: name, COMPONENT_LABEL: "head"}},
            "spec": pod_spec,
        },
    }


def _worker_group(name: str, s: Mapping[str, Any], start: int | None) -> dict[str, Any]:
    res = s["resources"]
    size: dict[str, str] = {"cpu": _cpu_quantity(res["cpus"]), "memory": res["memory"]}
    gpu_resource = res["gpuResourceName"]
    if res["gpus"]:
        size[gpu_resource] = str(res["gpus"])
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": s["image"],
                "imagePullPolicy": s["imagePullPolicy"],
                "resources": {"requests": dict(size), "limits": dict(size)},
            }
        ]
    }
    bounds = drain_bounds(s)
    decorate(pod_spec, name, s, scheduling=res, grace_s=bounds.worker_grace_s, model=True)
    # A stopped model pod first has Ray move its replica, which finishes its streams.
    pod_spec["containers"][0]["lifecycle"] = drain_hook(bounds.worker_drain_deadline_s)
    start_params = {"resources": _ray_resources({MODEL_SLOT: 1})}
    if res["gpus"] and gpu_resource != DEFAULT_GPU_RESOURCE:
        # KubeRay counts GPUs from resource names it knows; a MIG slice it does not.
        start_params["num-gpus"] = str(res["gpus"])
    return {
        "groupName": WORKER_GROUP,
        # The pods a new Ray cluster starts with (creation, upgrade). KubeRay leaves a running
        # cluster's replica counts to Ray's autoscaler, which follows Serve's replicas.
        "replicas": start if start is not None else desired_replicas(s),
        "minReplicas": 0,
        "maxReplicas": WORKER_POD_CEILING,
        "rayStartParams": start_params,
        "template": {
            "metadata": {"labels": {NAME_LABEL: name, COMPONENT_LABEL: "model"}},
            "spec": pod_spec,
        },
    }


def gcs_fault_tolerance(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """KubeRay's gcsFaultToleranceOptions: the GCS keeps its state in Redis, so a restarted head
    pod finds the cluster and the Serve application as they were. The password comes from a
    Secret key, never a literal."""
    ft = with_defaults(spec).get("gcsFaultTolerance")
    if not ft:
        return None
    options: dict[str, Any] = {"redisAddress": ft["redisAddress"]}
    if ft.get("redisPasswordSecretRef"):
        ref = ft["redisPasswordSecretRef"]
        options["redisPassword"] = {
            "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}
        }
    if ft.get("externalStorageNamespace"):
        options["externalStorageNamespace"] = ft["externalStorageNamespace"]
    return options


def render_rayservice(
    name: str, spec: Mapping[str, Any], start: int | None = None
) -> dict[str, Any]:
    """The desired RayService for ChatStream `name`, without namespace and owner (see adopt).
    `start`: with autoscaling, the model replica count a new Ray cluster and a reconfigured
    deployment start with (replicas.py: the current count); None: the spec's."""
    s = with_defaults(spec)
    start = clamped(s, start)
    drain = drain_bounds(s)
    rayservice: dict[str, Any] = {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {
            "upgradeStrategy": upgrade_strategy(s),
            # The old cluster after an upgrade finishes the streams it holds.
            "rayClusterDeletionDelaySeconds": drain.cluster_deletion_delay_s,
            "serveConfigV2": yaml.safe_dump(serve_config(s, start), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": s["rayVersion"],
                # Always: Ray's autoscaler removes a worker pod only once Serve is done with it.
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "idleTimeoutSeconds": drain.pod_idle_timeout_s,
                    # The autoscaler sidecar runs in the head pod: "restricted" too.
                    "securityContext": container_security_context(s),
                },
                "headGroupSpec": _head_group(name, s),
                "workerGroupSpecs": [_worker_group(name, s, start)],
            },
        },
    }
    ft = gcs_fault_tolerance(s)
    if ft:
        rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] = ft
    return rayservice
