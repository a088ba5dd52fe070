"""The ChatStream spec: its defaults and the checks its OpenAPI schema cannot express.

The API server applies the CRD's defaults before the operator sees an object; `with_defaults`
applies the same ones again so that the renderer also works on objects that skipped it (older
stored objects, tests). The values the Serve application shares come from `chatstream_defaults`
(serve_app/config.py uses the same); a unit test keeps DEFAULTS equal to the CRD's `default:`
values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import chatstream_defaults as shared

from .schema import name_problems, spec_problems

DEFAULTS: dict[str, Any] = {
    "engine": "transformers",
    "model": {
        "source": "",
        "ggufFile": "",
        "tokenizer": "",
        "revision": "",
        "dtype": "auto",
        "quantization": "none",
        "device": "auto",
        "maxContextTokens": 0,
        "systemPrompt": "",
    },
    # enforceEager has no default: unset lets the engine choose (on for a CPU, off on a GPU).
    "vllm": {
        "gpuMemoryUtilization": shared.VLLM_GPU_MEMORY_UTILIZATION,
        "tensorParallelSize": shared.VLLM_TENSOR_PARALLEL_SIZE,
        "cpuKvCacheGib": shared.VLLM_CPU_KV_CACHE_GIB,
    },
    "mock": {"mode": shared.MOCK_MODE, "initialWaitSec": 0, "timePerTokenSec": 0, "failMarker": ""},
    "maxOngoingRequests": shared.MAX_ONGOING_REQUESTS,
    "maxQueuedRequests": shared.MAX_QUEUED_REQUESTS,
    "retryAfterSec": shared.RETRY_AFTER_SEC,
    "streamIntervalMs": shared.STREAM_INTERVAL_MS,
    "generation": {
        "temperature": shared.TEMPERATURE,
        "topK": shared.TOP_K,
        "topP": shared.TOP_P,
        "maxNewTokens": shared.MAX_NEW_TOKENS,
    },
    "resources": {"gpus": 0, "cpus": 1, "memory": "4Gi", "gpuResourceName": "nvidia.com/gpu"},
    "ingress": {"replicas": shared.INGRESS_REPLICAS},
    "session": {
        "store": shared.SESSION_STORE,
        "cookieName": shared.SESSION_COOKIE_NAME,
        "ttlSec": shared.SESSION_TTL_SEC,
        "maxTurns": shared.SESSION_MAX_TURNS,
        "cookieSecure": shared.COOKIE_SECURE,
    },
    "image": shared.SERVE_IMAGE,
    "imagePullPolicy": "IfNotPresent",
    "rayVersion": "2.60.0",
    "head": {"cpus": 2, "memory": "4Gi"},
    "upgradeStrategy": {"type": "NewCluster"},
    # How long a scale-down or an upgrade may take (see drain.py).
    "drain": {
        "timePerTokenSec": shared.DRAIN_TIME_PER_TOKEN_SEC,
        "firstTokenSec": shared.DRAIN_FIRST_TOKEN_SEC,
        "podIdleTimeoutSec": shared.DRAIN_POD_IDLE_TIMEOUT_SEC,
    },
}

# Defaults inside optional objects: they apply only when the object itself is present.
AUTOSCALING_DEFAULTS: dict[str, Any] = {
    "minReplicas": 1,
    "targetOngoingRequests": shared.TARGET_ONGOING_REQUESTS,
}


def merged(defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """A deep copy of `defaults` with `given` merged over it (nested mappings key by key)."""
    result = copy.deepcopy(dict(defaults))
    for key, value in (given or {}).items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def with_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `spec` with every schema default filled in."""
    full = merged(DEFAULTS, spec)
    if full.get("autoscaling") is not None:
        full["autoscaling"] = merged(AUTOSCALING_DEFAULTS, full["autoscaling"])
    return full


def is_autoscaling(spec: Mapping[str, Any]) -> bool:
    return spec.get("autoscaling") is not None


def desired_replicas(spec: Mapping[str, Any]) -> int:
    """Model replicas to start with: spec.replicas, else 1 (fixed) or minReplicas (autoscaling)."""
    full = with_defaults(spec)
    if full.get("replicas") is not None:
        return int(full["replicas"])
    if is_autoscaling(full):
        return int(full["autoscaling"]["minReplicas"])
    return 1


def clamped(spec: Mapping[str, Any], count: int | None) -> int | None:
    """`count` within the spec's autoscaling bounds; None without autoscaling or a count."""
    s = with_defaults(spec)
    if count is None or not is_autoscaling(s):
        return None
    bounds = s["autoscaling"]
    return max(bounds["minReplicas"], min(bounds["maxReplicas"], count))


def image_repository(image: str) -> str:
    """The repository of an image reference: without its tag and digest, as written (a registry
    port stays: `host:5000/team/app:1.0` -> `host:5000/team/app`)."""
    repository = image.split("@", 1)[0]
    slash, colon = repository.rfind("/"), repository.rfind(":")
    return repository[:colon] if colon > slash else repository


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """Whether `image` is in one of the `allowed` repositories, or below one of them
    (`registry.example.com/ml` allows `registry.example.com/ml/chatstream-serve:1.0`, not
    `registry.example.com/ml-other/x`). No list means every image is allowed."""
    if not allowed:
        return True
    repository = image_repository(image)
    return any(
        repository == prefix.rstrip("/") or repository.startswith(prefix.rstrip("/") + "/")
        for prefix in allowed
    )


def validate(
    spec: Mapping[str, Any],
    allowed_image_repositories: Sequence[str] = (),
    name: str | None = None,
) -> list[str]:
    """What makes the spec unusable, each naming its field; empty when it is usable: the CRD's
    own schema (checked again here: it is not always applied, see schema.py), KubeRay's rules
    for the name, and the rules the schema cannot express.
    `allowed_image_repositories` is the operator's allow-list for spec.image (empty: any)."""
    problems = name_problems(name) if name is not None else []
    problems += spec_problems(spec)
    if problems:
        return problems  # the checks below assume the schema's types
    full = with_defaults(spec)
    if not image_allowed(full["image"], allowed_image_repositories):
        problems.append(
            f"spec.image ({full['image']}) is not in an allowed repository "
            f"({', '.join(allowed_image_repositories)})"
        )
    session = full["session"]
    if session["store"] == "redis" and not session.get("redisUrlSecretRef"):
        problems.append(
            "spec.session.store is redis but spec.session.redisUrlSecretRef is not set: "
            "name the Secret key that holds the Redis URL"
        )
    if full["engine"] == "mock" and full["resources"]["gpus"] > 0:
        problems.append(
            f"spec.resources.gpus ({full['resources']['gpus']}) must be 0 with the mock engine, "
            "which never uses a GPU"
        )
    problems += _tensor_parallel_problems(full)
    if full["engine"] == "vllm" and full["image"] == shared.SERVE_IMAGE:
        problems.append(
            "spec.engine is vllm but spec.image is the default serve image "
            f"({shared.SERVE_IMAGE}), which has no vLLM: set spec.image to the vLLM image "
            f"({shared.VLLM_IMAGE}, built from Dockerfile.vllm) or your own build of it"
        )
    if is_autoscaling(full):
        bounds = full["autoscaling"]
        low, high = bounds["minReplicas"], bounds["maxReplicas"]
        if low > high:
            problems.append(
                f"spec.autoscaling.minReplicas ({low}) must not exceed "
                f"spec.autoscaling.maxReplicas ({high})"
            )
        elif full.get("replicas") is not None and not low <= full["replicas"] <= high:
            problems.append(
                f"spec.replicas ({full['replicas']}) must lie within the autoscaling bounds "
                f"[{low}, {high}]; scale within them or remove spec.autoscaling"
            )
    if (full.get("gcsFaultTolerance") or {}).get("externalStorageNamespace"):
        problems.append(
            "spec.gcsFaultTolerance.externalStorageNamespace is unsafe with KubeRay's new-cluster "
            "upgrades: the old cluster's Redis cleanup deletes the namespace the new cluster uses "
            "(ray-project/ray#39525, kuberay#5052); remove it (each Ray cluster then keeps its "
            "state under its own uid)"
        )
    upgrade = full["upgradeStrategy"]
    if upgrade["type"] == "NewClusterWithIncrementalUpgrade" and not upgrade.get(
        "clusterUpgradeOptions"
    ):
        problems.append(
            "spec.upgradeStrategy.clusterUpgradeOptions is required with "
            "NewClusterWithIncrementalUpgrade: name the Gateway API class (gatewayClassName), "
            "stepSizePercent and intervalSeconds"
        )
    if full["maxQueuedRequests"] == 0:
        problems.append(
            "spec.maxQueuedRequests must be -1 (no limit) or at least 1: "
            "Ray Serve has no zero-length queue"
        )
    ingress, head_cpus = full["ingress"]["replicas"], full["head"]["cpus"]
    if ingress > head_cpus:
        problems.append(
            f"spec.ingress.replicas ({ingress}) exceeds spec.head.cpus ({head_cpus}): each "
            "ingress replica takes one CPU of the head pod"
        )
    if full["model"]["device"] == "cuda" and full["resources"]["gpus"] == 0:
        problems.append(
            "spec.model.device is cuda but spec.resources.gpus is 0: the model pods get no GPU"
        )
    return problems


# KubeRay's NewClusterWithIncrementalUpgrade shifts traffic through a Gateway and an HTTPRoute
# of the Kubernetes Gateway API, which it creates itself.
INCREMENTAL_UPGRADE = "NewClusterWithIncrementalUpgrade"
GATEWAY_API_GROUP, GATEWAY_API_VERSION = "gateway.networking.k8s.io", "v1"
GATEWAY_API_RESOURCES = ("gateways", "httproutes")


def needs_gateway_api(spec: Mapping[str, Any]) -> bool:
    return with_defaults(spec)["upgradeStrategy"]["type"] == INCREMENTAL_UPGRADE


def gateway_api_problem(spec: Mapping[str, Any], served: set[str]) -> str | None:
    """Why the spec cannot run where the Gateway API serves `served`, naming what to install;
    None when it can."""
    if not needs_gateway_api(spec):
        return None
    missing = [r for r in GATEWAY_API_RESOURCES if r not in served]
    if not missing:
        return None
    return (
        f"spec.upgradeStrategy.type {INCREMENTAL_UPGRADE} needs the Kubernetes Gateway API, "
        f"but the cluster serves no {GATEWAY_API_GROUP}/{GATEWAY_API_VERSION} "
        f"{', '.join(missing)}: install the Gateway API CRDs (standard channel, "
        "https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api) and a Gateway "
        "controller for spec.upgradeStrategy.clusterUpgradeOptions.gatewayClassName, and run "
        "KubeRay 1.5+ with its feature gate RayServiceIncrementalUpgrade=true; or use "
        "upgradeStrategy NewCluster. The operator checks again every minute"
    )


def tensor_parallel_size(spec: Mapping[str, Any]) -> int:
    """GPUs one model replica spans: vLLM's tensor parallelism, 1 for every other engine."""
    full = with_defaults(spec)
    return int(full["vllm"]["tensorParallelSize"]) if full["engine"] == "vllm" else 1


def _tensor_parallel_problems(full: Mapping[str, Any]) -> list[str]:
    """A replica spanning several GPUs holds them all on its one model pod (one placement group,
    STRICT_PACK), so the pod's GPUs are exactly the tensor-parallel size."""
    size, gpus = full["vllm"]["tensorParallelSize"], full["resources"]["gpus"]
    if size == 1:
        return []
    if full["engine"] != "vllm":
        return [
            f"spec.vllm.tensorParallelSize ({size}) needs spec.engine vllm "
            f"(the {full['engine']} engine runs a replica on one device)"
        ]
    if gpus != size:
        return [
            f"spec.resources.gpus ({gpus}) must equal spec.vllm.tensorParallelSize ({size}): "
            "a replica spans that many GPUs of its one model pod"
        ]
    return []
