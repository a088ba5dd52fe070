"""Issue 11 on the real operator against kmock (see harness.run_recreate_scenario): a ChatStream
re-created while its predecessor's RayService awaits garbage collection, a pre-existing Secret,
an image outside the allow-list, and a deletion after the operator is gone."""

from __future__ import annotations

import asyncio

import pytest
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for
from harness import NAME, RecreateResult, run_recreate_scenario

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run() -> RecreateResult:
    return asyncio.run(run_recreate_scenario())


def _owner_uid(obj: dict) -> str:
    (owner,) = obj["metadata"]["ownerReferences"]
    return owner["uid"]


def test_the_new_chatstream_waits_for_the_old_rayservice(run):
    assert run.waiting["spec"] == {"serveConfigV2": "old"}  # not taken over, not patched
    assert _owner_uid(run.waiting) != run.new_uid
    # Its status is not mirrored from the predecessor's RayService.
    assert "readyReplicas" not in run.waiting_status and "endpoint" not in run.waiting_status


def test_the_new_chatstream_is_reconciled_once_the_old_rayservice_is_gone(run):
    """The old code raised PermanentError here and never reconciled the new ChatStream."""
    assert _owner_uid(run.rayservice) == run.new_uid
    assert errors(validator_for(load_crd(KUBERAY_CRD_PATH), "v1"), run.rayservice) == []
    assert _owner_uid(run.networkpolicy) == run.new_uid
    assert run.operator_survived


def test_an_existing_secret_is_left_alone(run):
    assert run.secret_after == run.secret_before
    assert "ownerReferences" not in run.secret_after["metadata"]
    cluster = run.rayservice["spec"]["rayClusterConfig"]
    (container,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    secret_env = [e for e in container["env"] if "valueFrom" in e]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in secret_env}
    assert refs["CHATSTREAM_SESSION_SECRET"] == f"{NAME}-chatstream"


def test_an_image_outside_the_allow_list_is_invalid_spec(run):
    conditions = run.invalid_image["status"]["conditions"]
    (invalid,) = [c for c in conditions if c["type"] == "InvalidSpec"]
    assert invalid["status"] == "True"
    assert invalid["message"].startswith("spec.image (evil.example.com/miner:1) is not in an")
    assert run.invalid_image_rayservice is None
    assert run.operator_survived  # an InvalidSpec, not a crash loop


def test_deleting_after_uninstall_leaves_nothing_stuck(run):
    assert run.finalizers == []
    assert run.gone_after_uninstall


def test_a_name_kuberay_refuses_is_invalid_spec(run):
    """KubeRay refuses a RayService name over 47 characters; the ChatStream would stall."""
    conditions = run.invalid_name["status"]["conditions"]
    (invalid,) = [c for c in conditions if c["type"] == "InvalidSpec"]
    assert invalid["status"] == "True"
    assert invalid["message"].startswith("metadata.name (chat-xxx")
    assert "at most 47" in invalid["message"]
    assert run.invalid_name_rayservice is None
