"""The real kopf operator against kmock's stateful Kubernetes API emulator (watch streams too).

The scenario runs once per module (see harness.py); each test checks one step's outcome.
"""

from __future__ import annotations

import asyncio

import kubernetes_validate
import pytest
import yaml
from chatstream_operator.network import render_network_policy
from chatstream_operator.render import render_rayservice
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for
from harness import (
    NAME,
    NAMESPACE,
    SPEC,
    UID,
    ApiCall,
    LifecycleResult,
    run_lifecycle_scenario,
    run_operator_lifecycle,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run() -> LifecycleResult:
    # Its own event loop: the scenario is shared by the module's tests.
    return asyncio.run(run_lifecycle_scenario())


def _rs(run: LifecycleResult, step: str) -> dict:
    return run.snapshots[step]["rayservice"]


def _cs_status(run: LifecycleResult, step: str) -> dict:
    return run.snapshots[step]["chatstream"]["status"]


def _condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def _worker_replicas(rayservice: dict) -> int:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]


def _serve_replicas(rayservice: dict) -> int:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config["applications"][0]["deployments"][0]["num_replicas"]


def test_create_renders_an_owned_rayservice(run):
    rs = _rs(run, "create")
    assert rs["metadata"]["namespace"] == NAMESPACE
    (owner,) = rs["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "chatstream.dev/v1alpha1",
        "kind": "ChatStream",
        "name": NAME,
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    expected = render_rayservice(NAME, SPEC)
    assert rs["spec"] == expected["spec"]
    assert expected["metadata"]["labels"].items() <= rs["metadata"]["labels"].items()


def test_the_generated_secret_is_created_once_and_owned(run):
    secret = run.snapshots["create"]["secret"]
    assert secret["metadata"]["name"] == f"{NAME}-chatstream"
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ChatStream", NAME, UID)
    assert set(secret["data"]) == {"session-secret", "admin-token"}
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    # Never rewritten: the same keys at every step, so cookies outlive every change.
    assert all(snap["secret"]["data"] == secret["data"] for snap in run.snapshots.values())
    creates = [c for c in run.calls if c.resource == "secrets"]
    assert {c.verb for c in creates} == {"create"}  # the operator never reads a Secret


def test_the_head_reads_secrets_from_the_generated_secret_and_the_workers_none(run):
    cluster = _rs(run, "create")["spec"]["rayClusterConfig"]
    (worker,) = cluster["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["env"] == []
    for group in [cluster["headGroupSpec"]]:
        (container,) = group["template"]["spec"]["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert refs["CHATSTREAM_SESSION_SECRET"] == {
            "name": f"{NAME}-chatstream",
            "key": "session-secret",
        }
        assert refs["CHATSTREAM_ADMIN_TOKEN"]["name"] == f"{NAME}-chatstream"


def test_the_network_policy_is_created_owned_and_valid(run):
    policy = run.snapshots["create"]["networkpolicy"]
    assert policy["spec"] == render_network_policy(NAME)["spec"]
    (owner,) = policy["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("ChatStream", UID)
    kubernetes_validate.validate(policy, "1.33.0", strict=True)


def test_an_opened_network_policy_is_closed_again(run):
    assert run.snapshots["policy-drift"]["networkpolicy"]["spec"] == (
        render_network_policy(NAME)["spec"]
    )


def test_no_finalizer_so_nothing_is_stuck_without_the_operator(run):
    """kopf puts a finalizer only on objects with timers (or deletion handlers); without one,
    a ChatStream deleted after `helm uninstall` goes at once (the old drift timer's finalizer
    kept it Terminating, with its GPU pods running, until removed by hand)."""
    for step, snapshot in run.snapshots.items():
        assert not snapshot["chatstream"]["metadata"].get("finalizers"), step


def test_create_writes_status(run):
    status = _cs_status(run, "create")
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://{NAME}-serve-svc.{NAMESPACE}.svc:8000"
    assert status["selector"] == f"chatstream.dev/name={NAME},chatstream.dev/component=model"
    assert (status["replicas"], status["readyReplicas"]) == (1, 0)
    assert _condition(status, "InvalidSpec")["status"] == "False"
    assert _condition(status, "Ready")["status"] == "False"
    assert _condition(status, "Progressing")["status"] == "True"
    # kmock may deliver the creation twice; the second pass must find nothing to do.
    assert status["reconcile"]["rayService"] == NAME
    assert status["reconcile"]["action"] in ("created", "unchanged")
    creates = [c for c in run.calls if c.verb == "create" and c.resource == "rayservices"]
    assert len(creates) == 1


def test_every_rayservice_the_operator_wrote_is_valid_for_kuberay(run):
    validator = validator_for(load_crd(KUBERAY_CRD_PATH), "v1")
    for step, snapshot in run.snapshots.items():
        assert errors(validator, snapshot["rayservice"]) == [], step


def test_scaling_follows_with_one_patch(run):
    rs = _rs(run, "scale")
    assert (_worker_replicas(rs), _serve_replicas(rs)) == (3, 3)
    assert run.rayservice_patches["scale"] == 1
    assert _cs_status(run, "scale")["replicas"] == 3


def test_no_rewrite_when_nothing_changed(run):
    assert run.rayservice_patches["no-op"] == 0
    assert _rs(run, "no-op")["spec"] == _rs(run, "scale")["spec"]


def test_rayservice_status_is_mirrored(run):
    status = _cs_status(run, "ray-ready")
    assert (status["replicas"], status["readyReplicas"]) == (3, 3)
    ready = _condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Serving")
    assert _condition(status, "Progressing")["status"] == "False"
    assert run.rayservice_patches["ray-ready"] == 0  # a status change is not drift


def test_drift_is_repaired(run):
    assert _worker_replicas(_rs(run, "drift")) == 3
    assert run.rayservice_patches["drift"] == 1
    assert any(e.get("reason") == "DriftRepaired" for e in run.events)


def test_invalid_spec_reports_and_leaves_the_rayservice_alone(run):
    status = _cs_status(run, "invalid")
    invalid = _condition(status, "InvalidSpec")
    assert invalid["status"] == "True" and invalid["reason"] == "InvalidSpec"
    assert invalid["message"].startswith("spec.autoscaling.minReplicas (5)")
    assert invalid["observedGeneration"] == 3
    assert run.rayservice_patches["invalid"] == 0
    assert _rs(run, "invalid")["spec"] == _rs(run, "drift")["spec"]
    event, _ = [e for e in run.events if e.get("reason") == "InvalidSpec"]
    assert event["type"] == "Warning" and "spec.autoscaling.minReplicas" in event["message"]
    assert event["involvedObject"]["name"] == NAME


def test_a_spec_the_schema_refuses_is_refused_without_it(run):
    """The emulator, like an old CRD, lets `replicas: -5` through; the operator does not."""
    status = _cs_status(run, "unchecked")
    invalid = _condition(status, "InvalidSpec")
    assert invalid["status"] == "True" and invalid["observedGeneration"] == 4
    assert invalid["message"].startswith("spec.replicas (-5) must be at least 0")
    assert run.rayservice_patches["unchecked"] == 0
    assert _rs(run, "unchecked")["spec"] == _rs(run, "drift")["spec"]
    assert status["replicas"] == 3 and "-5" not in _condition(status, "Ready")["message"]


def test_fixing_the_spec_clears_invalid_spec(run):
    status = _cs_status(run, "fixed")
    assert _condition(status, "InvalidSpec")["status"] == "False"
    assert status["observedGeneration"] == 5
    assert _worker_replicas(_rs(run, "fixed")) == 3
    assert run.rayservice_patches["fixed"] == 0


def test_only_the_invalid_spec_logged_errors_and_the_operator_stopped_cleanly(run):
    assert all(
        "spec.autoscaling.minReplicas" in m or "spec.replicas (-5)" in m for m in run.error_logs
    ), run.error_logs
    assert run.stopped_cleanly


def test_events_say_what_the_operator_did(run):
    reasons = [e.get("reason") for e in run.events]
    assert reasons.count("Created") == 1
    assert reasons.count("Updated") == 1  # the scale; the fixed spec asks for what already runs
    assert reasons.count("DriftRepaired") == 1
    (created,) = [e for e in run.events if e["reason"] == "Created"]
    assert created["type"] == "Normal"
    assert created["involvedObject"]["kind"] == "ChatStream"
    assert created["involvedObject"]["uid"] == UID


def test_calls_are_recorded_as_rbac_verbs(run):
    calls = set(run.calls)
    assert all(isinstance(c, ApiCall) for c in calls)
    assert {c.verb for c in calls} <= {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
    }
    expected = {
        ApiCall("list", "chatstream.dev", "v1alpha1", "chatstreams", False, None),
        ApiCall("watch", "chatstream.dev", "v1alpha1", "chatstreams", False, None),
        ApiCall("patch", "chatstream.dev", "v1alpha1", "chatstreams", True, None),
        ApiCall("patch", "chatstream.dev", "v1alpha1", "chatstreams", True, "status"),
        ApiCall("get", "chatstream.dev", "v1alpha1", "chatstreams", True, None),
        ApiCall("watch", "ray.io", "v1", "rayservices", False, None),
        ApiCall("get", "ray.io", "v1", "rayservices", True, None),
        ApiCall("create", "ray.io", "v1", "rayservices", True, None),
        ApiCall("patch", "ray.io", "v1", "rayservices", True, None),
        ApiCall("create", "", "v1", "events", True, None),
        ApiCall("create", "", "v1", "secrets", True, None),
        ApiCall("get", "networking.k8s.io", "v1", "networkpolicies", True, None),
        ApiCall("create", "networking.k8s.io", "v1", "networkpolicies", True, None),
        ApiCall("patch", "networking.k8s.io", "v1", "networkpolicies", True, None),
        ApiCall("get", "policy", "v1", "poddisruptionbudgets", True, None),
        ApiCall("create", "policy", "v1", "poddisruptionbudgets", True, None),
        ApiCall("patch", "policy", "v1", "poddisruptionbudgets", True, None),
        # Owner references with blockOwnerDeletion (kopf.adopt), as admission checks them.
        ApiCall("update", "chatstream.dev", "v1alpha1", "chatstreams", True, "finalizers"),
    }
    assert expected <= calls, expected - calls
    # It never deletes anything: garbage collection removes the RayService with its owner.
    assert not {c for c in calls if c.verb == "delete"}


def test_a_namespaced_operator_makes_only_namespaced_calls():
    """`--namespace=NS` needs a Role in NS and nothing cluster-scoped."""
    calls = set(asyncio.run(run_operator_lifecycle(namespaces=[NAMESPACE])))
    assert {c for c in calls if not c.namespaced} == set()
    resources = {(c.group, c.resource) for c in calls}
    assert resources == {
        ("chatstream.dev", "chatstreams"),
        ("ray.io", "rayservices"),
        ("", "events"),
        ("", "secrets"),
        ("networking.k8s.io", "networkpolicies"),
        ("policy", "poddisruptionbudgets"),
    }


def test_a_disruption_budget_keeps_the_model_pods_up_through_a_node_drain(run):
    """One model pod evicted at a time; an edit of the budget is put back (policy-drift)."""
    budget = run.snapshots["create"]["disruptionbudget"]
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"chatstream.dev/name": NAME,
                                     "chatstream.dev/component": "model"}},
    }  # fmt: skip
    (owner,) = budget["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ChatStream", UID, True)
    assert run.snapshots["policy-drift"]["disruptionbudget"]["spec"]["maxUnavailable"] == 1
    # The pods it selects are the model pods the operator renders.
    worker = run.snapshots["create"]["rayservice"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    labels = worker[0]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_conditions_carry_the_generation_they_describe(run):
    for step in ("create", "scale", "ray-ready", "fixed"):
        status = _cs_status(run, step)
        generations = {c["type"]: c.get("observedGeneration") for c in status["conditions"]}
        assert set(generations.values()) == {status["observedGeneration"]}, (step, generations)


def test_the_pods_of_the_created_rayservice_pass_pod_security_restricted(run):
    """What the real operator created through the API: restricted pods, the pull secret on the
    head and the workers, the model cache on the workers."""
    from pod_security import violations

    cluster = run.snapshots["create"]["rayservice"]["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (worker,) = [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    sidecar = {"name": "autoscaler", "image": "x",
               "securityContext": cluster["autoscalerOptions"]["securityContext"]}  # fmt: skip
    assert violations({**head, "containers": [*head["containers"], sidecar]}) == []
    assert violations(worker) == []
    for pod in (head, worker):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert [v["name"] for v in worker["volumes"]] == ["model-cache"]
