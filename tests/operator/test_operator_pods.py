"""The pod template surface of the rendered RayService: Pod Security "restricted", private
registries, secrets as env, the model cache, scheduling, GPU resource names, grace periods."""

from __future__ import annotations

import copy

import pytest
from chatstream_operator.drain import drain_bounds
from chatstream_operator.render import render_rayservice

from tests.operator.crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for
from tests.operator.pod_security import violations

GPU = {
    "model": {"source": "Qwen/Qwen2.5-1.5B-Instruct", "device": "cuda",
              "tokenSecretRef": {"name": "hf", "key": "token"}},
    "resources": {"gpus": 1, "cpus": 4, "memory": "24Gi"},
}  # fmt: skip


def _cluster(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]


def _pods(rs: dict) -> dict[str, dict]:
    """The pods KubeRay makes from the RayService, as far as the operator decides them: the head
    (with the autoscaler sidecar, which KubeRay builds from autoscalerOptions) and the workers
    (with the init container KubeRay adds, which copies the Ray container's securityContext)."""
    cluster = _cluster(rs)
    head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
    sidecar = {
        "name": "autoscaler",
        "image": "x",
        "securityContext": cluster["autoscalerOptions"]["securityContext"],
    }
    head["containers"].append(sidecar)
    worker = copy.deepcopy(cluster["workerGroupSpecs"][0]["template"]["spec"])
    init = {
        "name": "wait-gcs-ready",
        "image": "x",
        "securityContext": worker["containers"][0]["securityContext"],
    }
    worker["initContainers"] = [init]
    return {"head": head, "worker": worker}


# --- the checker itself, against known-bad pods ------------------------------------------------

GOOD = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "c",
            "image": "x",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }
    ],
}


def _bad(path: str, value) -> dict:
    pod = copy.deepcopy(GOOD)
    target = pod
    *parents, key = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[key] = value
    return pod


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("hostNetwork", True),
        ("hostPID", True),
        ("hostIPC", True),
        ("volumes", [{"name": "h", "hostPath": {"path": "/"}}]),
        ("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
        ("securityContext.runAsNonRoot", False),
        ("securityContext.runAsUser", 0),
        ("securityContext.seccompProfile", {"type": "Unconfined"}),
        ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
        ("securityContext.seLinuxOptions", {"type": "spc_t"}),
        ("containers.0.securityContext.privileged", True),
        ("containers.0.securityContext.allowPrivilegeEscalation", True),
        ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}),
        ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]}),
        ("containers.0.securityContext.procMount", "Unmasked"),
        ("containers.0.securityContext.runAsUser", 0),
        ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
        ("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
    ],
)
def test_the_checker_refuses_known_bad_pods(path, value):
    assert violations(GOOD) == []
    assert violations(_bad(path, value))


def test_the_checker_refuses_a_pod_without_any_security_context():
    assert violations({"containers": [{"name": "c", "image": "x"}]})


# --- what the operator renders -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [{}, GPU, {"engine": "mock", "modelCache": {"size": "1Gi"}}])
def test_every_rendered_pod_passes_pod_security_restricted(spec):
    for kind, pod in _pods(render_rayservice("chat", spec)).items():
        assert violations(pod) == [], kind


def test_security_contexts_can_be_adjusted_but_start_restricted():
    spec = {"podSecurityContext": {"runAsUser": 2000}, "containerSecurityContext": {
        "readOnlyRootFilesystem": True}}  # fmt: skip
    pods = _pods(render_rayservice("chat", spec))
    for pod in pods.values():
        assert violations(pod) == []
        assert pod["securityContext"]["runAsUser"] == 2000
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # A user who loosens them gets what they asked for; the namespace's admission decides.
    loose = render_rayservice("chat", {"containerSecurityContext": {"privileged": True}})
    assert violations(_pods(loose)["worker"])


def test_private_registry_pull_secrets_reach_head_and_workers():
    rs = render_rayservice("chat", {"imagePullSecrets": [{"name": "regcred"}]})
    for pod in _pods(rs).values():
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_a_hugging_face_token_and_extra_env_come_from_secrets():
    spec = {**GPU, "env": [{"name": "HF_HUB_OFFLINE", "value": "0"}]}
    for pod in _pods(render_rayservice("chat", spec)).values():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
        }
        assert env["HF_HUB_OFFLINE"]["value"] == "0"


@pytest.mark.parametrize(
    ("cache", "kind"),
    [({"size": "50Gi", "storageClassName": "fast"}, "ephemeral"), ({"size": "50Gi"}, "emptyDir")],
)
def test_the_model_cache_is_mounted_at_hf_home_on_the_model_pods(cache, kind):
    pods = _pods(render_rayservice("chat", {**GPU, "modelCache": cache}))
    worker = pods["worker"]
    (volume,) = [v for v in worker["volumes"] if v["name"] == "model-cache"]
    assert kind in volume
    if kind == "ephemeral":
        claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["storageClassName"] == "fast"
        assert claim["resources"]["requests"]["storage"] == "50Gi"
    else:
        assert volume["emptyDir"]["sizeLimit"] == "50Gi"
    assert {"name": "model-cache", "mountPath": "/models"} in worker["containers"][0][
        "volumeMounts"
    ]
    assert "volumes" not in pods["head"]


def test_scheduling_of_head_and_model_pods():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu.type", "operator": "In", "values": ["h100"]}]}]}}}  # fmt: skip
    spec = {
        **GPU,
        "runtimeClassName": "nvidia",
        "priorityClassName": "chat-high",
        "resources": {**GPU["resources"], "affinity": affinity,
                      "nodeSelector": {"pool": "gpu"}},
        "head": {"nodeSelector": {"pool": "cpu"},
                 "tolerations": [{"key": "cpu-only", "operator": "Exists"}]},
    }  # fmt: skip
    pods = _pods(render_rayservice("chat", spec))
    head, worker = pods["head"], pods["worker"]
    assert worker["runtimeClassName"] == "nvidia" and "runtimeClassName" not in head
    assert worker["priorityClassName"] == head["priorityClassName"] == "chat-high"
    assert worker["affinity"] == affinity and "affinity" not in head
    assert worker["nodeSelector"] == {"pool": "gpu"} and head["nodeSelector"] == {"pool": "cpu"}
    assert head["tolerations"] == [{"key": "cpu-only", "operator": "Exists"}]


def test_a_mig_slice_is_the_gpu_resource_and_ray_is_told_the_count():
    spec = {**GPU, "resources": {**GPU["resources"], "gpuResourceName": "nvidia.com/mig-1g.10gb"}}
    group = _cluster(render_rayservice("chat", spec))["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
    assert group["rayStartParams"]["num-gpus"] == "1"
    whole = _cluster(render_rayservice("chat", GPU))["workerGroupSpecs"][0]
    assert whole["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert "num-gpus" not in whole["rayStartParams"]  # KubeRay counts nvidia.com/gpu itself


def test_grace_periods_cover_the_drain_bounds():
    for spec in ({}, {"generation": {"maxNewTokens": 4096}}, {"drain": {"timePerTokenSec": 0}}):
        bounds = drain_bounds(spec)
        pods = _pods(render_rayservice("chat", spec))
        assert pods["worker"]["terminationGracePeriodSeconds"] >= bounds.answer_s + 10
        assert pods["head"]["terminationGracePeriodSeconds"] >= bounds.ingress_s + 10
    defaults = _pods(render_rayservice("chat", {}))
    assert defaults["worker"]["terminationGracePeriodSeconds"] > 30  # Kubernetes' default


def test_the_full_surface_is_valid_for_kuberay_and_the_crd():
    spec = {
        **GPU,
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "modelCache": {"size": "50Gi", "storageClassName": "fast"},
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "w",
                                                                   "readOnly": True}}],
        "volumeMounts": [{"name": "weights", "mountPath": "/weights", "readOnly": True}],
        "runtimeClassName": "nvidia",
        "priorityClassName": "high",
        "podSecurityContext": {"runAsUser": 1000},
        "containerSecurityContext": {"readOnlyRootFilesystem": False},
        "head": {"nodeSelector": {"pool": "cpu"}},
    }  # fmt: skip
    from chatstream_operator.spec import validate

    assert validate(spec, name="chat") == []
    kuberay = validator_for(load_crd(KUBERAY_CRD_PATH), "v1")
    assert errors(kuberay, render_rayservice("chat", spec)) == []


# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion >=1.29) and the tested one.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pods_and_the_disruption_budget_are_valid_kubernetes(version):
    import kubernetes_validate
    from chatstream_operator.disruption import render_disruption_budget

    spec = {
        **GPU,
        "imagePullSecrets": [{"name": "regcred"}],
        "modelCache": {"size": "50Gi", "storageClassName": "fast"},
        "runtimeClassName": "nvidia",
        "priorityClassName": "high",
        "head": {"tolerations": [{"key": "cpu", "operator": "Exists"}]},
    }
    for kind, pod_spec in _pods(render_rayservice("chat", spec)).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": kind}, "spec": pod_spec}
        kubernetes_validate.validate(pod, version, strict=True)
    budget = render_disruption_budget("chat")
    kubernetes_validate.validate({**budget, "metadata": {**budget["metadata"],
                                                         "namespace": "ns"}}, version, strict=True)


def test_the_gpu_walk_through_is_the_example_and_renders_restricted_pods():
    """operator/README.md's "Installing on a GPU cluster" ChatStream is examples/chatstream-gpu.yaml
    (so the walk-through is tested): valid, restricted, and valid for KubeRay."""
    import pathlib
    import re

    import yaml
    from chatstream_operator.spec import validate

    from tests.operator.crd_schema import ROOT, load_sample

    readme = (ROOT / "operator" / "README.md").read_text()
    section = readme[readme.index("**4. The ChatStream.**") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    sample = load_sample("chatstream-gpu.yaml")
    assert yaml.safe_load(block) == sample
    assert pathlib.Path(ROOT / "operator" / "examples" / "chatstream-gpu.yaml").is_file()
    name, spec = sample["metadata"]["name"], sample["spec"]
    assert validate(spec, name=name) == []
    rs = render_rayservice(name, spec)
    for pod in _pods(rs).values():
        assert violations(pod) == []
    assert errors(validator_for(load_crd(KUBERAY_CRD_PATH), "v1"), rs) == []
