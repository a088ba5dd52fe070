"""The real kopf operator against kmock's stateful Kubernetes API emulator (watch streams too).

The scenario runs once per module (see harness.py); each test checks one step's outcome.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml
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
    (event,) = [e for e in run.events if e.get("reason") == "InvalidSpec"]
    assert event["type"] == "Warning" and "spec.autoscaling.minReplicas" in event["message"]
    assert event["involvedObject"]["name"] == NAME


def test_fixing_the_spec_clears_invalid_spec(run):
    status = _cs_status(run, "fixed")
    assert _condition(status, "InvalidSpec")["status"] == "False"
    assert status["observedGeneration"] == 4
    assert _worker_replicas(_rs(run, "fixed")) == 3
    assert run.rayservice_patches["fixed"] == 0


def test_only_the_invalid_spec_logged_errors_and_the_operator_stopped_cleanly(run):
    assert all("spec.autoscaling.minReplicas" in m for m in run.error_logs), run.error_logs
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
    }
