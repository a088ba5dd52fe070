"""The pod template surface of the Ray head and model pods (pure): what a first install on a
real GPU cluster needs beyond the containers' size.

- security contexts that pass Pod Security "restricted" by default (the spec's
  `podSecurityContext` / `containerSecurityContext` are merged over them), also for KubeRay's
  autoscaler sidecar; KubeRay copies the Ray container's securityContext to the init container
  it adds to the workers;
- image pull secrets on both pods (KubeRay gives the head its own ServiceAccount with in-tree
  autoscaling, so the namespace default ServiceAccount's pull secrets never reach it);
- environment: the Secret references (credentials.py) on the head only, where the ingress
  replicas that use them run (the model pods never see the signing key, admin token, API keys
  or Redis URL), a Hugging Face token from a Secret (`model.tokenSecretRef` -> HF_TOKEN) and the
  spec's own `env` on both;
- volumes: a model cache at HF_HOME on the model pods, and the spec's own volumes;
- scheduling: runtimeClassName and the GPU resource name (model pods), priorityClassName,
  nodeSelector / tolerations / affinity per pod kind;
- terminationGracePeriodSeconds from the drain bound (drain.py), and on the model pods a preStop
  hook that drains the Ray node first (drain_hook).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from chatstream_defaults import ray_serve_env

from .credentials import secret_env
from .spec import merged

# The serve image's user (rayproject/ray: `ray`, uid 1000, group `users`, gid 100).
RAY_UID, RAY_GID = 1000, 100
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "fsGroup": RAY_GID,  # volumes (the model cache) writable by the ray user
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Where the serve image keeps Hugging Face downloads (Dockerfile.serve: HF_HOME=/models).
MODEL_CACHE_PATH = "/models"
MODEL_CACHE_VOLUME = "model-cache"
HF_TOKEN_ENV = "HF_TOKEN"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# Ray's drain reason for a node that will go away whatever happens (Ray 2.60: `ray drain-node`,
# the call autoscaler v2 makes; the node id defaults to the local node).
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
# Serve replicas' process titles (ray::ServeReplica:<app>:<deployment>); the brackets keep the
# pattern from matching the hook's own command line.
SERVE_REPLICA_PATTERN = "ray::Serve[R]eplica"


def drain_hook(deadline_s: int) -> dict[str, Any]:
    """The model container's preStop hook. Kubernetes runs it before it sends SIGTERM (a node
    drain, an eviction, a pod deletion), within the pod's grace period. It tells Ray that this
    node goes within `deadline_s`; Serve then migrates the node's model replica (it starts a
    replacement elsewhere and stops this one gracefully, finishing its streams within its
    graceful_shutdown_timeout_s, by the deadline). The hook waits until no Serve replica runs
    on the pod any more, at most until the deadline; only then does Ray get SIGTERM. Without
    the hook, SIGTERM would kill the replica and cut its streams."""
    script = (
        f"ray drain-node --reason={DRAIN_REASON} "
        '--reason-message="Kubernetes stops pod $HOSTNAME" '
        f"--deadline-remaining-seconds={deadline_s} || true; "
        f"end=$(($(date +%s) + {deadline_s})); "
        f"while grep -qs '{SERVE_REPLICA_PATTERN}' /proc/[0-9]*/cmdline "
        '&& [ "$(date +%s)" -lt "$end" ]; do sleep 1; done'
    )
    return {"preStop": {"exec": {"command": ["/bin/sh", "-c", script]}}}


def pod_security_context(s: Mapping[str, Any]) -> dict[str, Any]:
    return merged(POD_SECURITY_CONTEXT, s.get("podSecurityContext"))


def container_security_context(s: Mapping[str, Any]) -> dict[str, Any]:
    return merged(CONTAINER_SECURITY_CONTEXT, s.get("containerSecurityContext"))


def container_env(name: str, s: Mapping[str, Any], *, model: bool) -> list[dict[str, Any]]:
    """The service's Secret references (head only: the ingress replicas, which alone use them,
    run there), then the Hugging Face token, Ray Serve's mode, then the spec's own env."""
    env = [] if model else secret_env(name, s)
    token = s["model"].get("tokenSecretRef")
    if token:
        ref = {"name": token["name"], "key": token["key"]}
        env.append({"name": HF_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}})
    own = [copy.deepcopy(dict(e)) for e in s.get("env") or []]
    # Ray Serve's mode as `serve run` has it (chatstream_defaults.RAY_SERVE_ENV): every Ray
    # process must see it, so it goes on both containers; the spec's own env may override it.
    named = dict.fromkeys(e.get("name") for e in own)
    env += [{"name": k, "value": v} for k, v in ray_serve_env(named).items()]
    return env + own


def model_cache_volume(s: Mapping[str, Any]) -> dict[str, Any] | None:
    cache = s.get("modelCache")
    if not cache:
        return None
    if cache.get("storageClassName"):
        claim = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": cache["storageClassName"],
            "resources": {"requests": {"storage": cache["size"]}},
        }
        return {
            "name": MODEL_CACHE_VOLUME,
            "ephemeral": {"volumeClaimTemplate": {"spec": claim}},
        }
    return {"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": cache["size"]}}


def decorate(
    pod_spec: dict[str, Any],
    name: str,
    s: Mapping[str, Any],
    *,
    scheduling: Mapping[str, Any],
    grace_s: int,
    model: bool,
) -> dict[str, Any]:
    """Add the shared pod surface to a rendered head or worker pod spec (its one container)."""
    (container,) = pod_spec["containers"]
    container["env"] = container_env(name, s, model=model)
    container["securityContext"] = container_security_context(s)
    pod_spec["securityContext"] = pod_security_context(s)
    pod_spec["terminationGracePeriodSeconds"] = grace_s
    if s.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [{"name": x["name"]} for x in s["imagePullSecrets"]]
    if s.get("priorityClassName"):
        pod_spec["priorityClassName"] = s["priorityClassName"]
    if model and s.get("runtimeClassName"):
        pod_spec["runtimeClassName"] = s["runtimeClassName"]
    if scheduling.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(scheduling["nodeSelector"])
    if scheduling.get("tolerations"):
        pod_spec["tolerations"] = [dict(t) for t in scheduling["tolerations"]]
    if scheduling.get("affinity"):
        pod_spec["affinity"] = copy.deepcopy(dict(scheduling["affinity"]))
    volumes = [copy.deepcopy(dict(v)) for v in s.get("volumes") or []]
    mounts = [copy.deepcopy(dict(m)) for m in s.get("volumeMounts") or []]
    cache = model_cache_volume(s) if model else None
    if cache:
        volumes.append(cache)
        mounts.append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH})
    if volumes:
        pod_spec["volumes"] = volumes
    if mounts:
        container["volumeMounts"] = mounts
    return pod_spec
