"""RayService status -> ChatStream status and conditions (pure)."""

from __future__ import annotations

from chatstream_operator.render import render_rayservice
from chatstream_operator.status import (
    INVALID_SPEC,
    PROGRESSING,
    READY,
    derive_status,
    set_condition,
    status_changes,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def _rayservice(spec: dict, app: str = "", model: str = "", **cluster) -> dict:
    rs = render_rayservice("chat", spec)
    rs["metadata"]["generation"] = 1
    if app:
        rs["status"] = {
            "observedGeneration": 1,
            "activeServiceStatus": {
                "applicationStatuses": {
                    "chatstream": {
                        "status": app,
                        "serveDeploymentStatuses": {"ChatModel": {"status": model}},
                    }
                },
                "rayClusterStatus": cluster,
            },
        }
    return rs


def _cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_missing_rayservice():
    status = derive_status("chat", "ns", None, [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (0, 0)
    assert _cond(status, READY)["status"] == "False"
    assert _cond(status, READY)["reason"] == "RayServiceMissing"
    assert _cond(status, PROGRESSING)["status"] == "True"
    assert status["endpoint"] == "http://chat-serve-svc.ns.svc:8000"
    assert status["selector"] == "chatstream.dev/name=chat,chatstream.dev/component=model"


def test_fresh_rayservice_without_status_is_progressing():
    status = derive_status("chat", "ns", _rayservice({"replicas": 3}), [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (3, 0)
    assert _cond(status, READY)["status"] == "False"
    assert _cond(status, PROGRESSING)["status"] == "True"


def test_running_and_healthy_is_ready():
    rs = _rayservice({"replicas": 3}, "RUNNING", "HEALTHY", readyWorkerReplicas=3)
    status = derive_status("chat", "ns", rs, [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (3, 3)
    assert _cond(status, READY) == {
        "type": READY,
        "status": "True",
        "reason": "Serving",
        "message": "3/3 model replicas ready",
        "lastTransitionTime": T0,
    }
    assert _cond(status, PROGRESSING)["status"] == "False"


def test_scaling_up_counts_ready_workers_and_is_progressing():
    rs = _rayservice({"replicas": 3}, "DEPLOYING", "UPDATING", readyWorkerReplicas=1)
    status = derive_status("chat", "ns", rs, [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (3, 1)
    assert _cond(status, READY)["reason"] == "Deploying"
    assert _cond(status, PROGRESSING)["status"] == "True"


def test_failed_deploy_is_neither_ready_nor_progressing():
    rs = _rayservice({}, "DEPLOY_FAILED", "UNHEALTHY", readyWorkerReplicas=1)
    rs["status"]["activeServiceStatus"]["applicationStatuses"]["chatstream"]["message"] = "boom"
    status = derive_status("chat", "ns", rs, [], T0)
    assert status["readyReplicas"] == 0
    assert _cond(status, READY)["reason"] == "DeployFailed"
    assert _cond(status, READY)["message"] == "boom"
    assert _cond(status, PROGRESSING)["status"] == "False"


def test_autoscaling_reports_the_autoscalers_choice():
    spec = {"engine": "mock", "autoscaling": {"minReplicas": 1, "maxReplicas": 5}}
    rs = _rayservice(spec, "RUNNING", "HEALTHY", desiredWorkerReplicas=4, readyWorkerReplicas=4)
    status = derive_status("chat", "ns", rs, [], T0)
    assert (status["replicas"], status["readyReplicas"]) == (4, 4)


def test_upgrade_in_progress_is_ready_and_progressing():
    rs = _rayservice({}, "RUNNING", "HEALTHY", readyWorkerReplicas=1)
    rs["status"]["pendingServiceStatus"] = {"rayClusterName": "chat-raycluster-new"}
    status = derive_status("chat", "ns", rs, [], T0)
    assert _cond(status, READY)["status"] == "True"
    assert _cond(status, PROGRESSING)["reason"] == "Upgrading"


def test_invalid_spec_condition_is_kept():
    conditions = set_condition([], INVALID_SPEC, True, "InvalidSpec", "spec.x is bad", T0, 4)
    status = derive_status("chat", "ns", None, conditions, T1)
    assert _cond(status, INVALID_SPEC) == conditions[0]


def test_transition_time_moves_only_when_status_flips():
    conds = set_condition([], READY, False, "Deploying", "", T0)
    same = set_condition(conds, READY, False, "Deploying", "other message", T1)
    assert same[0]["lastTransitionTime"] == T0 and same[0]["message"] == "other message"
    flipped = set_condition(same, READY, True, "Serving", "", T1)
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["status"] == "True"
    assert len(flipped) == 1


def test_status_changes_are_only_the_differences():
    derived = derive_status("chat", "ns", None, [], T0)
    assert status_changes(derived, derived) == {}
    changed = status_changes({**derived, "readyReplicas": 2}, derived)
    assert changed == {"readyReplicas": 0}


def test_every_condition_carries_the_generation_it_describes():
    rs = _rayservice({"replicas": 3}, "RUNNING", "HEALTHY", readyWorkerReplicas=3)
    conditions = set_condition([], INVALID_SPEC, False, "Valid", "", T0, 7)
    status = derive_status("chat", "ns", rs, conditions, T0, 7)
    assert {c["type"]: c.get("observedGeneration") for c in status["conditions"]} == {
        INVALID_SPEC: 7,
        READY: 7,
        PROGRESSING: 7,
    }


def test_a_rebuild_of_a_serving_application_stays_ready():
    """Serve rebuilds in rolling fashion (DEPLOYING, the model deployment UPDATING): the old
    replicas keep serving, so Ready stays True while Progressing says Updating."""
    serving = derive_status(
        "chat", "ns", _rayservice({"replicas": 3}, "RUNNING", "HEALTHY", readyWorkerReplicas=3),
        [], T0, 1,
    )  # fmt: skip
    rebuild = _rayservice({"replicas": 3}, "DEPLOYING", "UPDATING", readyWorkerReplicas=3)
    status = derive_status("chat", "ns", rebuild, serving["conditions"], T1, 2)
    assert (_cond(status, READY)["status"], _cond(status, READY)["reason"]) == ("True", "Serving")
    assert _cond(status, READY)["lastTransitionTime"] == T0
    assert (_cond(status, PROGRESSING)["status"], _cond(status, PROGRESSING)["reason"]) == (
        "True",
        "Updating",
    )
    # A first deployment has not served yet: not Ready.
    first = derive_status("chat", "ns", rebuild, [], T0, 1)
    assert _cond(first, READY)["status"] == "False"


def test_conditions_are_a_list_map_keyed_by_type():
    from tests.operator.crd_schema import chatstream_schema

    conditions = chatstream_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_an_upgrade_that_waits_for_resources_says_so():
    rs = _rayservice({"replicas": 3}, "RUNNING", "HEALTHY", readyWorkerReplicas=3)
    rs["status"]["pendingServiceStatus"] = {
        "rayClusterName": "chat-raycluster-new",
        "rayClusterStatus": {"readyWorkerReplicas": 1, "desiredWorkerReplicas": 3},
    }
    progressing = _cond(derive_status("chat", "ns", rs, [], T0), PROGRESSING)
    assert progressing["reason"] == "Upgrading"
    assert "1/3 worker pods ready" in progressing["message"]
    assert "Pending" in progressing["message"] and "GPUs twice" in progressing["message"]


def test_a_running_head_without_serve_status_names_the_likely_network_policy_block():
    """KubeRay outside kuberay-system cannot reach the dashboard through the NetworkPolicy: the
    Serve application never deploys. The status says where to look."""
    rs = _rayservice({"replicas": 1})
    rs["status"] = {"activeServiceStatus": {"rayClusterStatus": {
        "state": "ready", "conditions": [{"type": "HeadPodReady", "status": "True"}]}}}  # fmt: skip
    progressing = _cond(derive_status("chat", "ns", rs, [], T0), PROGRESSING)
    assert progressing["reason"] == "Creating"
    assert "--control-plane-peers" in progressing["message"]
    assert "kuberay-system" in progressing["message"]
    fresh = _cond(derive_status("chat", "ns", _rayservice({"replicas": 1}), [], T0), PROGRESSING)
    assert "control-plane" not in fresh["message"]
