"""Pure rendering spec -> RayService: content, KubeRay's schema, and serve_app's config."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml
from chatstream_operator import render
from chatstream_operator.render import render_rayservice, serve_args
from chatstream_operator.spec import validate
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, load_sample, validator_for

from chatstream_defaults import VLLM_IMAGE
from serve_app import config as serve_config_module
from serve_app.config import ChatStreamConfig

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fixed-cpu": {"engine": "mock", "replicas": 3, "resources": {"cpus": 0.5, "memory": "1Gi"}},
    "gpu": {
        "model": {"source": "Qwen/Qwen2.5-7B-Instruct", "dtype": "bfloat16", "device": "cuda"},
        "replicas": 2,
        "resources": {
            "gpus": 1,
            "cpus": 4,
            "memory": "24Gi",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    },
    "autoscaling": {
        "engine": "mock",
        "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetOngoingRequests": 3},
    },
    "autoscaling-gpu-initial": {
        "replicas": 4,
        "resources": {"gpus": 2},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8},
    },
    "vllm-tensor-parallel": {
        "engine": "vllm",
        "image": VLLM_IMAGE,
        "model": {"source": "Qwen/Qwen2.5-14B-Instruct", "dtype": "bfloat16", "device": "cuda"},
        "vllm": {"tensorParallelSize": 2, "gpuMemoryUtilization": 0.85, "enforceEager": False},
        "resources": {"gpus": 2, "cpus": 4, "memory": "48Gi"},
    },
    "vllm-cpu": {"engine": "vllm", "image": VLLM_IMAGE, "vllm": {"cpuKvCacheGib": 4}},
    "fair-share": {"fairShareWeights": {"team-a": 3, "batch": 1}},
    "sample": load_sample("chatstream-sample.yaml")["spec"],
    "mock-sample": load_sample("chatstream-mock.yaml")["spec"],
    "vllm-sample": load_sample("chatstream-vllm.yaml")["spec"],
}


@pytest.fixture(scope="module")
def kuberay():
    return validator_for(load_crd(KUBERAY_CRD_PATH), "v1")


def _serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _deployment(rayservice: dict, name: str) -> dict:
    (app,) = _serve_config(rayservice)["applications"]
    (deployment,) = [d for d in app["deployments"] if d["name"] == name]
    return deployment


def _model(rayservice: dict) -> dict:
    return _deployment(rayservice, render.MODEL_DEPLOYMENT_NAME)


def _workers(rayservice: dict) -> dict:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


@pytest.mark.parametrize("case", SPECS)
def test_rendered_rayservice_validates_against_kuberay_crd(kuberay, case):
    assert validate(SPECS[case]) == []
    assert errors(kuberay, render_rayservice("chat", SPECS[case])) == []


@pytest.mark.parametrize("case", SPECS)
def test_rendered_args_are_valid_serve_app_config(case):
    rendered = _serve_config(render_rayservice("chat", SPECS[case]))
    (app,) = rendered["applications"]
    config = ChatStreamConfig.model_validate(app["args"])
    # The args and the deployment options say the same thing.
    model = _model(render_rayservice("chat", SPECS[case]))
    assert model["max_ongoing_requests"] == config.max_ongoing_requests
    assert model["max_queued_requests"] == config.max_queued_requests
    # The replica's GPUs: its own, plus those of its placement group (tensor parallelism).
    bundles = model.get("placement_group_bundles", [])
    gpus = model["ray_actor_options"]["num_gpus"] + sum(b.get("GPU", 0) for b in bundles)
    assert gpus == config.num_gpus
    assert model["ray_actor_options"]["num_cpus"] == config.num_cpus
    # Replica counts live in the deployment override only (a scale is not an args change).
    assert not config.autoscaling
    assert not {"num_replicas", "min_replicas", "max_replicas"} & app["args"].keys()


def test_constants_match_serve_app():
    assert render.APP_IMPORT_PATH == serve_config_module.APP_IMPORT_PATH
    assert render.DEFAULT_APP_NAME == serve_config_module.DEFAULT_APP_NAME
    assert render.MODEL_DEPLOYMENT_NAME == serve_config_module.MODEL_DEPLOYMENT_NAME


def test_application_shape():
    rs = render_rayservice("chat", {"engine": "mock", "maxOngoingRequests": 7})
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert rs["metadata"]["name"] == "chat"
    assert rs["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "chatstream-operator"
    (app,) = _serve_config(rs)["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (
        "chatstream",
        "serve_app:app",
        "/",
    )
    assert app["args"]["engine"] == "mock"
    assert app["args"]["max_ongoing_requests"] == 7


def test_fixed_replicas_size_the_worker_group():
    rs = render_rayservice("chat", SPECS["fixed-cpu"])
    model, workers = _model(rs), _workers(rs)
    assert model["num_replicas"] == 3 and "autoscaling_config" not in model
    # A new cluster starts with 3 pods; Ray's autoscaler then follows Serve's replicas.
    assert (workers["replicas"], workers["minReplicas"]) == (3, 0)
    assert workers["maxReplicas"] == render.WORKER_POD_CEILING
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]


def test_unset_replicas_means_one():
    rs = render_rayservice("chat", {})
    assert _model(rs)["num_replicas"] == 1
    assert _workers(rs)["replicas"] == 1


def test_autoscaling_bounds_reach_serve_and_the_worker_group():
    rs = render_rayservice("chat", SPECS["autoscaling"])
    model, workers = _model(rs), _workers(rs)
    assert model["num_replicas"] is None  # as Serve's `num_replicas: auto` sets it
    assert model["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 3,
    }
    assert (workers["replicas"], workers["minReplicas"]) == (2, 0)
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_replicas_are_the_initial_count_when_autoscaling():
    rs = render_rayservice("chat", SPECS["autoscaling-gpu-initial"])
    assert _model(rs)["autoscaling_config"]["initial_replicas"] == 4
    assert _workers(rs)["replicas"] == 4


def test_gpu_spec_requests_gpus_on_the_model_pods_only():
    rs = render_rayservice("chat", SPECS["gpu"])
    model, workers = _model(rs), _workers(rs)
    assert model["ray_actor_options"] == {
        "num_gpus": 1,
        "num_cpus": 4,
        "resources": {render.MODEL_SLOT: 1},
    }
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert _serve_config(rs)["applications"][0]["args"]["model"] == "Qwen/Qwen2.5-7B-Instruct"


def test_each_worker_offers_exactly_one_model_slot():
    """Model replicas ask for one slot, workers offer one: worker pods == model replicas."""
    rs = render_rayservice("chat", SPECS["fixed-cpu"])
    offered = _workers(rs)["rayStartParams"]["resources"]
    # rayStartParams are shell-quoted JSON: "{\"chatstream_model\": 1}"
    assert yaml.safe_load(offered.strip('"').replace('\\"', '"')) == {render.MODEL_SLOT: 1}
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"]
    assert render.MODEL_SLOT not in yaml.safe_load(head.strip('"').replace('\\"', '"'))


def test_ingress_replicas_run_on_the_head_only():
    """An ingress replica on a model pod would keep it (and its GPU) from ever being released:
    each asks for a slot that only the head offers."""
    rs = render_rayservice("chat", {**SPECS["fixed-cpu"], "ingress": {"replicas": 2}})
    deployments = {d["name"]: d for d in _serve_config(rs)["applications"][0]["deployments"]}
    ingress = deployments[render.INGRESS_DEPLOYMENT_NAME]["ray_actor_options"]
    assert ingress["resources"] == {render.HEAD_SLOT: 1}
    cluster = rs["spec"]["rayClusterConfig"]

    def offered(params):
        return yaml.safe_load(params["resources"].strip('"').replace('\\"', '"'))

    assert offered(cluster["headGroupSpec"]["rayStartParams"])[render.HEAD_SLOT] >= 2
    for group in cluster["workerGroupSpecs"]:
        assert render.HEAD_SLOT not in offered(group["rayStartParams"])
    from serve_app.config import ChatStreamConfig

    assert ingress["num_cpus"] == ChatStreamConfig().ingress_num_cpus


def test_pod_labels_match_the_scale_selector():
    rs = render_rayservice("chat", {})
    labels = _workers(rs)["template"]["metadata"]["labels"]
    selector = dict(kv.split("=") for kv in render.model_selector("chat").split(","))
    assert selector.items() <= labels.items()


def test_endpoint_is_the_serve_service():
    assert render.endpoint("chat", "team-a") == "http://chat-serve-svc.team-a.svc:8000"


def test_rendering_is_deterministic():
    assert render_rayservice("c", SPECS["gpu"]) == render_rayservice("c", SPECS["gpu"])
    assert render_rayservice("c", {}) != render_rayservice("c", {"replicas": 2})


INVALID = [
    ({"engine": "mock", "resources": {"gpus": 1}}, "spec.resources.gpus"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
    ({"replicas": 9, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}, "spec.replicas"),
    ({"replicas": 0, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}, "spec.replicas"),
    ({"maxQueuedRequests": 0}, "spec.maxQueuedRequests"),
    ({"ingress": {"replicas": 3}, "head": {"cpus": 2}}, "spec.ingress.replicas"),
    ({"model": {"device": "cuda"}}, "spec.model.device"),
    ({"vllm": {"tensorParallelSize": 2}, "resources": {"gpus": 2}}, "spec.vllm.tensorParallelSize"),
    (
        {
            "engine": "vllm",
            "image": VLLM_IMAGE,
            "vllm": {"tensorParallelSize": 2},
            "resources": {"gpus": 1},
        },
        "spec.resources.gpus",
    ),
    ({"engine": "vllm"}, "spec.engine is vllm but spec.image is the default serve image"),
    ({"engine": "vllm", "vllm": {"gpuMemoryUtilization": 1.5}}, "spec.vllm.gpuMemoryUtilization"),
    ({"engine": "vllm", "vllm": {"gpuMemoryUtilization": 0}}, "spec.vllm.gpuMemoryUtilization"),
    ({"vllm": {"cpuKvCacheGib": 0}}, "spec.vllm.cpuKvCacheGib"),
    ({"fairShareWeights": {"team-a": 0}}, "spec.fairShareWeights"),
    ({"fairShareWeights": {"team-a": "3"}}, "spec.fairShareWeights"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_specs_name_the_field(spec, field):
    problems = validate(spec)
    assert len(problems) == 1 and problems[0].startswith(field)


# (Autoscaling bounds are not in the args, so serve_app never sees them; INVALID covers them.)
SERVE_APP_REFUSES = [
    {"engine": "mock", "resources": {"gpus": 1}},
    {"maxQueuedRequests": 0},
]


@pytest.mark.parametrize("spec", SERVE_APP_REFUSES)
def test_what_serve_app_refuses_the_operator_refuses_first(spec):
    """Everything ChatStreamConfig's cross-field check rejects is an InvalidSpec already."""
    with pytest.raises(ValueError):
        ChatStreamConfig.model_validate(serve_args(spec))
    assert validate(spec)


def _grid():
    """Specs over the knobs that serve_app's cross-field checks look at."""
    engines, gpus, queues = ("mock", "transformers"), (0, 1), (-1, 0, 1)
    bounds, replicas = (None, (1, 4), (5, 2), (0, 1)), (None, 0, 3, 9)
    for engine, gpu, queue, bound, count in itertools.product(
        engines, gpus, queues, bounds, replicas
    ):
        spec: dict[str, Any] = {
            "engine": engine,
            "resources": {"gpus": gpu},
            "maxQueuedRequests": queue,
        }
        if bound:
            spec["autoscaling"] = {"minReplicas": bound[0], "maxReplicas": bound[1]}
        if count is not None:
            spec["replicas"] = count
        yield spec


def test_every_spec_the_operator_accepts_is_a_valid_serve_app_config():
    """Over a grid of the cross-field knobs: what validate() lets through, serve_app accepts."""
    accepted = [spec for spec in _grid() if not validate(spec)]
    for spec in accepted:
        ChatStreamConfig.model_validate(serve_args(spec))
    assert 20 < len(accepted) < len(list(_grid()))


def test_vllm_options_reach_the_serve_app_under_its_names():
    args = serve_args(SPECS["vllm-tensor-parallel"])
    assert args["engine"] == "vllm"
    assert args["gpu_memory_utilization"] == 0.85
    assert args["tensor_parallel_size"] == 2
    assert args["enforce_eager"] is False
    assert args["num_gpus"] == 2
    cpu = serve_args(SPECS["vllm-cpu"])
    # Unset enforceEager stays unset: the engine chooses (eager on a CPU).
    assert cpu["cpu_kv_cache_gib"] == 4 and cpu["enforce_eager"] is None


def test_tensor_parallel_replica_reserves_its_gpus_as_one_placement_group():
    model = _model(render_rayservice("chat", SPECS["vllm-tensor-parallel"]))
    assert model["placement_group_strategy"] == "STRICT_PACK"
    bundles = model["placement_group_bundles"]
    assert [b["GPU"] for b in bundles] == [1, 1]
    # Serve places the replica in bundle 0: its options must fit there, its model slot too.
    options = model["ray_actor_options"]
    assert options["num_gpus"] == 0
    assert bundles[0][render.MODEL_SLOT] == 1 and bundles[0]["CPU"] == options["num_cpus"]
    # Its one model pod carries every GPU of the group.
    limits = _workers(render_rayservice("chat", SPECS["vllm-tensor-parallel"]))["template"]
    assert limits["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_the_placement_group_is_a_valid_serve_deployment():
    """Ray Serve's own checks of the deployment options (bundle 0 must hold the replica)."""
    from ray.serve._private.config import ReplicaConfig

    model = _model(render_rayservice("chat", SPECS["vllm-tensor-parallel"]))
    ReplicaConfig.create(
        object,
        ray_actor_options=model["ray_actor_options"],
        placement_group_bundles=model["placement_group_bundles"],
        placement_group_strategy=model["placement_group_strategy"],
    )
    too_big = dict(model["ray_actor_options"], num_cpus=model["ray_actor_options"]["num_cpus"] + 1)
    with pytest.raises(ValueError):
        ReplicaConfig.create(
            object,
            ray_actor_options=too_big,
            placement_group_bundles=model["placement_group_bundles"],
        )


def test_single_gpu_replicas_have_no_placement_group():
    for case in ("gpu", "vllm-cpu", "defaults"):
        assert "placement_group_bundles" not in _model(render_rayservice("chat", SPECS[case]))


def test_fair_share_weights_reach_the_serve_app():
    assert serve_args(SPECS["fair-share"])["fair_share_weights"] == {"team-a": 3, "batch": 1}
    assert serve_args({})["fair_share_weights"] == {}
