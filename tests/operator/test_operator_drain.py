"""Issue 13 on the operator side (pure): a scale is a scale, drain bounds, upgrades, scale phases.

What Serve and KubeRay do with a changed RayService is judged with their own rules:
- Serve (Ray 2.60): `get_app_code_version` hashes import_path, runtime_env and args; a new code
  version rebuilds the application and restarts every replica. Otherwise each deployment
  option has an update type (DeploymentConfig's fields), and only a changed
  `ray_actor_options` (or a HeavyWeight option) restarts that deployment's replicas.
- KubeRay: a RayService's rayClusterConfig is hashed without the worker groups' replicas,
  min/maxReplicas, workersToDelete and tolerations, nor the upgrade strategy
  (GenerateHashWithoutReplicasAndWorkersToDelete); another hash means a new Ray cluster.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from chatstream_operator import render
from chatstream_operator.drain import SWITCH_SLACK_SEC, drain_bounds
from chatstream_operator.render import render_rayservice, serve_args
from chatstream_operator.status import PROGRESSING, READY, derive_status
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for
from ray.serve._private.config import DeploymentConfig
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve._private.utils import DeploymentOptionUpdateType
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.config import ChatStreamConfig

BASE: dict[str, Any] = {"engine": "mock", "replicas": 3, "maxOngoingRequests": 2}
# CI-sized answers: 200 tokens at 10 ms plus a 1 s allowance.
SHORT = {
    "drain": {"timePerTokenSec": 0.01, "firstTokenSec": 1},
    "generation": {"maxNewTokens": 200},
}


def _merged(spec: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _app(rayservice: dict) -> dict:
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app


def _deployments(rayservice: dict) -> dict[str, dict]:
    return {d["name"]: d for d in _app(rayservice)["deployments"]}


def _cluster_identity(rayservice: dict) -> dict:
    """rayClusterConfig as KubeRay hashes it to decide on a new Ray cluster."""
    cluster = copy.deepcopy(rayservice["spec"]["rayClusterConfig"])
    cluster.pop("upgradeStrategy", None)
    cluster.pop("suspend", None)
    cluster["headGroupSpec"]["template"]["spec"].pop("tolerations", None)
    for group in cluster["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key, None)
        group.get("scaleStrategy", {}).pop("workersToDelete", None)
        group["template"]["spec"].pop("tolerations", None)
    return cluster


def _serve_effect(before: dict, after: dict) -> str:
    """What Ray 2.60's Serve does when `after`'s serveConfigV2 replaces `before`'s:
    'rebuild' (new code version: every replica restarts), 'restart' (some deployment's replicas
    restart), 'in-place' (options applied to running replicas) or 'none'."""
    old_app, new_app = _app(before), _app(after)
    if get_app_code_version(ServeApplicationSchema(**old_app)) != get_app_code_version(
        ServeApplicationSchema(**new_app)
    ):
        return "rebuild"
    old, new = _deployments(before), _deployments(after)
    effect = "none"
    for name in old.keys() | new.keys():
        a, b = old.get(name, {}), new.get(name, {})
        for option in a.keys() | b.keys():
            if option == "name" or a.get(option) == b.get(option):
                continue
            if option == "ray_actor_options":
                return "restart"
            extra = DeploymentConfig.model_fields[option].json_schema_extra or {}
            if extra.get("update_type") == DeploymentOptionUpdateType.HeavyWeight:
                return "restart"
            effect = "in-place"
    return effect


def _kuberay_effect(before: dict, after: dict) -> str:
    return (
        "same-cluster" if _cluster_identity(before) == _cluster_identity(after) else "new-cluster"
    )


AUTO: dict[str, Any] = {"replicas": None, "autoscaling": {"minReplicas": 1, "maxReplicas": 6}}

# What each kind of spec change does to the running service (from BASE, or BASE + a starting
# change). Documented in operator/README.md.
CHANGES: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("scale down", {}, {"replicas": 1}, "in-place", "same-cluster"),
    ("scale up", {}, {"replicas": 5}, "in-place", "same-cluster"),
    ("autoscaling bounds", AUTO, {"autoscaling": {"minReplicas": 2, "maxReplicas": 9,
                                                  "targetOngoingRequests": 1}},
     "in-place", "same-cluster"),
    ("autoscaling delays", AUTO, {"autoscaling": {"upscaleDelaySec": 5, "downscaleDelaySec": 300,
                                                  "lookBackPeriodSec": 20}},
     "in-place", "same-cluster"),
    # Serve's code version covers the deployments' autoscaling policies: on or off rebuilds.
    ("fixed to autoscaling", {}, AUTO, "rebuild", "same-cluster"),
    ("concurrency", {}, {"maxOngoingRequests": 8, "maxQueuedRequests": 4}, "rebuild",
     "same-cluster"),
    # The pods' grace period follows the bound, rounded up to a minute (pod template: hashed).
    ("drain bound", {}, {"drain": {"firstTokenSec": 12}}, "in-place", "same-cluster"),
    ("drain bound past a minute", {}, {"drain": {"timePerTokenSec": 0.5}}, "in-place",
     "new-cluster"),
    ("pod idle timeout", {}, {"drain": {"podIdleTimeoutSec": 30}}, "none", "new-cluster"),
    ("generation defaults", {}, {"generation": {"temperature": 0.2}}, "rebuild", "same-cluster"),
    ("model resources", {}, {"resources": {"cpus": 2}}, "rebuild", "new-cluster"),
    ("image", {}, {"image": "chatstream-serve:0.2.0"}, "none", "new-cluster"),
    ("pod memory", {}, {"resources": {"memory": "8Gi"}}, "none", "new-cluster"),
    ("ray version", {}, {"rayVersion": "2.61.0"}, "none", "new-cluster"),
    ("head", {}, {"head": {"cpus": 4}}, "none", "new-cluster"),
    ("ingress replicas", {}, {"ingress": {"replicas": 2}}, "rebuild", "same-cluster"),
    ("sessions", {}, {"session": {"ttlSec": 600}}, "rebuild", "same-cluster"),
    ("node placement", {}, {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}},
     "none", "same-cluster"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("start", "change", "serve", "kuberay"),
    [row[1:] for row in CHANGES],
    ids=[row[0] for row in CHANGES],
)
def test_what_a_spec_change_does(start, change, serve, kuberay):
    first = _merged(BASE, start)
    before = render_rayservice("chat", first)
    after = render_rayservice("chat", _merged(first, change))
    assert (_serve_effect(before, after), _kuberay_effect(before, after)) == (serve, kuberay)


def test_a_scale_touches_only_the_model_replica_count():
    """replicas 3 -> 1 (`kubectl scale`, an HPA): the application's args, the ingress and every
    other model option stay as they are; so does the Ray cluster (no new one)."""
    three = render_rayservice("chat", BASE)
    one = render_rayservice("chat", {**BASE, "replicas": 1})
    assert _app(three)["args"] == _app(one)["args"]
    assert not {"num_replicas", "min_replicas", "max_replicas"} & _app(one)["args"].keys()
    before, after = _deployments(three), _deployments(one)
    assert before[render.INGRESS_DEPLOYMENT_NAME] == after[render.INGRESS_DEPLOYMENT_NAME]
    changed = {k for k in before["ChatModel"] if before["ChatModel"][k] != after["ChatModel"][k]}
    assert changed == {"num_replicas"}
    assert (before["ChatModel"]["num_replicas"], after["ChatModel"]["num_replicas"]) == (3, 1)
    # Serve applies num_replicas without touching a running replica.
    extra = DeploymentConfig.model_fields["num_replicas"].json_schema_extra
    assert extra["update_type"] == DeploymentOptionUpdateType.LightWeight
    assert _cluster_identity(three) == _cluster_identity(one)


def test_every_render_is_a_valid_serve_config():
    """Serve's own schema accepts what the operator renders (incl. num_replicas: null with an
    autoscaling_config, as Serve's `num_replicas: auto` does)."""
    for spec in (BASE, {}, {"autoscaling": {"maxReplicas": 4}}, _merged(BASE, SHORT)):
        config = yaml.safe_load(render_rayservice("chat", spec)["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(config)


def test_drain_bounds_follow_the_longest_answer():
    default = drain_bounds({})
    assert default.answer_s == 10 + 256 * 0.25 == 74
    assert default.ingress_s == 148
    assert default.wait_loop_s == 2.0  # Serve's default period, the cap
    assert default.cluster_deletion_delay_s == 148 + SWITCH_SLACK_SEC
    assert default.pod_idle_timeout_s == 60
    short = drain_bounds(SHORT)
    assert (short.answer_s, short.ingress_s, short.wait_loop_s) == (3, 6, 0.15)
    assert short.cluster_deletion_delay_s == 6 + SWITCH_SLACK_SEC
    longer = drain_bounds({"generation": {"maxNewTokens": 1024}})
    assert longer.answer_s == 10 + 1024 * 0.25


def test_both_deployments_get_the_drain_bounds():
    deployments = _deployments(render_rayservice("chat", _merged(BASE, SHORT)))
    model, ingress = deployments["ChatModel"], deployments[render.INGRESS_DEPLOYMENT_NAME]
    assert (model["graceful_shutdown_timeout_s"], model["graceful_shutdown_wait_loop_s"]) == (
        3,
        0.15,
    )
    assert (ingress["graceful_shutdown_timeout_s"], ingress["graceful_shutdown_wait_loop_s"]) == (
        6,
        0.15,
    )
    # Neither needs a restart: Serve reconfigures running replicas.
    for option in ("graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"):
        update = DeploymentConfig.model_fields[option].json_schema_extra["update_type"]
        assert update in (
            DeploymentOptionUpdateType.NeedsReconfigure,
            DeploymentOptionUpdateType.NeedsActorReconfigure,
        )


def test_upgrade_settings_are_rendered_and_valid_for_kuberay():
    rs = render_rayservice("chat", _merged(BASE, SHORT))
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] == 6 + SWITCH_SLACK_SEC
    assert errors(validator_for(load_crd(KUBERAY_CRD_PATH), "v1"), rs) == []


def test_pods_follow_serve_through_rays_autoscaler():
    """The worker pods are sized by Ray's autoscaler, which removes only idle pods: a pod whose
    model replica still drains is busy. The operator never names pods to delete."""
    rs = render_rayservice("chat", _merged(BASE, {"drain": {"podIdleTimeoutSec": 45}}))
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 45
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"]) == (3, 0)
    assert "scaleStrategy" not in group


# --- status: the phase of a scale --------------------------------------------------------------

T0 = "2026-01-01T00:00:00Z"


def _reported(spec: dict, app: str, model: str, pods: int | None, ready: int, **status) -> dict:
    rs = render_rayservice("chat", spec)
    rs["metadata"]["generation"] = 2
    cluster: dict[str, Any] = {"readyWorkerReplicas": ready}
    if pods is not None:
        cluster["desiredWorkerReplicas"] = pods
    rs["status"] = {
        "observedGeneration": 2,
        "activeServiceStatus": {
            "applicationStatuses": {
                "chatstream": {
                    "status": app,
                    "serveDeploymentStatuses": {"ChatModel": {"status": model}},
                }
            },
            "rayClusterStatus": cluster,
        },
        **status,
    }
    return rs


def _conditions(rs: dict) -> tuple[tuple[str, str], tuple[str, str, str]]:
    conds = {c["type"]: c for c in derive_status("chat", "ns", rs, [], T0)["conditions"]}
    ready, progressing = conds[READY], conds[PROGRESSING]
    return (ready["status"], ready["reason"]), (
        progressing["status"],
        progressing["reason"],
        progressing["message"],
    )


def test_scale_down_phases_serve_first_then_pods():
    one = _merged(BASE, {"replicas": 1, **SHORT})
    # 1. Serve drains two of three model replicas; the service keeps serving.
    ready, progressing = _conditions(_reported(one, "DEPLOYING", "DOWNSCALING", 3, 3))
    assert ready == ("True", "Serving")
    assert progressing[:2] == ("True", "ScalingDown")
    assert "within 3s" in progressing[2]
    # 2. Serve is done; two idle pods wait for the autoscaler's idle timeout.
    ready, progressing = _conditions(_reported(one, "RUNNING", "HEALTHY", 3, 1))
    assert ready == ("True", "Serving")
    assert progressing[:2] == ("True", "ReleasingPods")
    assert "2 worker pods" in progressing[2] and "60s" in progressing[2]
    # 3. The pods are gone.
    ready, progressing = _conditions(_reported(one, "RUNNING", "HEALTHY", 1, 1))
    assert progressing[:2] == ("False", "Stable")
    status = derive_status("chat", "ns", _reported(one, "RUNNING", "HEALTHY", 1, 1), [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)


def test_scale_up_phases():
    five = {**BASE, "replicas": 5}
    ready, progressing = _conditions(_reported(five, "DEPLOYING", "UPSCALING", 3, 3))
    assert ready[0] == "True" and progressing[:2] == ("True", "ScalingUp")
    # Serve has placed what it could; the autoscaler has not added the pods yet.
    _, progressing = _conditions(_reported(five, "RUNNING", "HEALTHY", 3, 3))
    assert progressing[:2] == ("True", "ScalingUp")
    status = derive_status("chat", "ns", _reported(five, "DEPLOYING", "UPSCALING", 5, 3), [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (5, 3)


def test_serve_autoscaling_has_no_pod_target_of_its_own():
    spec = {"engine": "mock", "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}
    _, progressing = _conditions(_reported(spec, "RUNNING", "HEALTHY", 3, 2))
    assert progressing[:2] == ("False", "Stable")
    _, progressing = _conditions(_reported(spec, "RUNNING", "DOWNSCALING", 3, 3))
    assert progressing[:2] == ("True", "ScalingDown")


def test_an_upgrade_shows_as_upgrading():
    rs = _reported(BASE, "RUNNING", "HEALTHY", 3, 3)
    rs["status"]["pendingServiceStatus"] = {"rayClusterName": "chat-raycluster-new"}
    ready, progressing = _conditions(rs)
    assert ready == ("True", "Serving")
    assert progressing[:2] == ("True", "Upgrading")


@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_serve_app_derives_the_operators_default_bounds(tokens):
    """`serve run` (no operator) drains like the operator's defaults (serve_app/builder.py)."""
    from serve_app.builder import drain_options  # the whole app: only this test needs it

    spec = {"generation": {"maxNewTokens": tokens}}
    config = ChatStreamConfig.model_validate(serve_args(spec))
    rendered = _deployments(render_rayservice("chat", spec))
    for name, factor in (("ChatModel", 1), (render.INGRESS_DEPLOYMENT_NAME, 2)):
        options = drain_options(config, factor)
        assert options == {key: rendered[name][key] for key in options}, name
