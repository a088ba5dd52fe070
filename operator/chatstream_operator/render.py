"""Pure rendering: a ChatStream spec -> the desired KubeRay RayService (ray.io/v1).

No API calls here. The handler adds ownership (`kopf.adopt`) and applies the result.

Layout of what is rendered:
- `serveConfigV2`: one Serve application running `serve_app:app` with the spec mapped onto the
  application's arguments (names of serve_app/config.py's ChatStreamConfig), and the model
  deployment's replicas / autoscaling, concurrency limits and Ray resources.
- a CPU head group: Serve's controller, the HTTP proxy and the ingress replicas run there.
- one worker group "model": one pod per model replica. Each worker advertises one unit of the
  custom Ray resource MODEL_SLOT and each model replica asks for one, so the worker count is the
  model replica count and model replicas never land on the head.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from . import (
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    OPERATOR_NAME,
    RAY_GROUP,
    RAY_VERSION,
)
from .credentials import secret_env
from .spec import desired_replicas, is_autoscaling, with_defaults

# Copies of serve_app/config.py's constants: the operator image does not ship serve_app, and a
# unit test asserts these stay equal to the originals.
APP_IMPORT_PATH = "serve_app:app"
DEFAULT_APP_NAME = "chatstream"
MODEL_DEPLOYMENT_NAME = "ChatModel"

MODEL_SLOT = "chatstream_model"
SERVE_PORT = 8000
WORKER_GROUP = "model"


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
    model, mock, gen, res, sess = (
        s["model"],
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
        "dtype": model["dtype"],
        "device": model["device"],
        "max_context_tokens": model["maxContextTokens"],
        "system_prompt": model["systemPrompt"],
        "mock_mode": mock["mode"],
        "mock_initial_wait_sec": mock["initialWaitSec"],
        "mock_time_per_token_sec": mock["timePerTokenSec"],
        "mock_fail_marker": mock["failMarker"],
        "max_ongoing_requests": s["maxOngoingRequests"],
        "max_queued_requests": s["maxQueuedRequests"],
        "num_replicas": desired_replicas(s),
        "min_replicas": 0,
        "max_replicas": 0,
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
    if is_autoscaling(s):
        bounds = s["autoscaling"]
        args["min_replicas"] = bounds["minReplicas"]
        args["max_replicas"] = bounds["maxReplicas"]
        args["target_ongoing_requests"] = bounds["targetOngoingRequests"]
    return args


def model_deployment(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Serve deployment options of the model deployment (they override the builder's)."""
    s = with_defaults(spec)
    deployment: dict[str, Any] = {"name": MODEL_DEPLOYMENT_NAME}
    if is_autoscaling(s):
        bounds = s["autoscaling"]
        deployment["autoscaling_config"] = {
            "min_replicas": bounds["minReplicas"],
            "initial_replicas": desired_replicas(s),
            "max_replicas": bounds["maxReplicas"],
            "target_ongoing_requests": bounds["targetOngoingRequests"],
        }
    else:
        deployment["num_replicas"] = desired_replicas(s)
    deployment["max_ongoing_requests"] = s["maxOngoingRequests"]
    deployment["max_queued_requests"] = s["maxQueuedRequests"]
    deployment["ray_actor_options"] = {
        "num_gpus": s["resources"]["gpus"],
        "num_cpus": s["resources"]["cpus"],
        "resources": {MODEL_SLOT: 1},
    }
    return deployment


def serve_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema) that goes, as YAML, into spec.serveConfigV2."""
    return {
        "applications": [
            {
                "name": DEFAULT_APP_NAME,
                "import_path": APP_IMPORT_PATH,
                "route_prefix": "/",
                "args": serve_args(spec),
                "deployments": [model_deployment(spec)],
            }
        ]
    }


def _cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def _head_group(name: str, s: Mapping[str, Any]) -> dict[str, Any]:
    head = s["head"]
    size = {"cpu": str(head["cpus"]), "memory": head["memory"]}
    return {
        # The head's CPUs are for Serve's controller, proxy and the ingress replicas.
        "rayStartParams": {"num-cpus": str(head["cpus"]), "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": {NAME_LABEL: name, COMPONENT_LABEL: "head"}},
            "spec": {
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
                        "resources": {"requests": dict(size), "limits": dict(size)},
                        "env": secret_env(name, s),
                    }
                ]
            },
        },
    }


def _worker_group(name: str, s: Mapping[str, Any]) -> dict[str, Any]:
    res = s["resources"]
    size: dict[str, str] = {"cpu": _cpu_quantity(res["cpus"]), "memory": res["memory"]}
    if res["gpus"]:
        size["nvidia.com/gpu"] = str(res["gpus"])
    if is_autoscaling(s):
        low, high = s["autoscaling"]["minReplicas"], s["autoscaling"]["maxReplicas"]
    else:
        low = high = desired_replicas(s)
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": s["image"],
                "imagePullPolicy": s["imagePullPolicy"],
                "resources": {"requests": dict(size), "limits": dict(size)},
                "env": secret_env(name, s),
            }
        ]
    }
    if res.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(res["nodeSelector"])
    if res.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in res["tolerations"]]
    # rayStartParams values are spliced into a shell command line, hence the quoted JSON.
    slot = '"' + json.dumps({MODEL_SLOT: 1}).replace('"', '\\"') + '"'
    return {
        "groupName": WORKER_GROUP,
        "replicas": desired_replicas(s),
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"resources": slot},
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


def render_rayservice(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The desired RayService for ChatStream `name`, without namespace and owner (see adopt)."""
    s = with_defaults(spec)
    rayservice: dict[str, Any] = {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels(name)},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(s), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": s["rayVersion"],
                # Explicit false rather than absent, so that leaving autoscaling is a real change.
                "enableInTreeAutoscaling": is_autoscaling(s),
                "headGroupSpec": _head_group(name, s),
                "workerGroupSpecs": [_worker_group(name, s)],
            },
        },
    }
    ft = gcs_fault_tolerance(s)
    if ft:
        rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] = ft
    return rayservice
