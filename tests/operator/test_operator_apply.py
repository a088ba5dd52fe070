"""apply_rayservice with the API calls replaced: create, patch, leave alone, refuse, retry."""

from __future__ import annotations

import copy
import logging

import kopf
import kubernetes
import pytest
import yaml
from chatstream_operator import handlers, kube
from chatstream_operator.options import OperatorOptions
from chatstream_operator.render import render_rayservice

OWNER = {
    "apiVersion": "chatstream.dev/v1alpha1",
    "kind": "ChatStream",
    "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-1", "labels": {"team": "a"}},
}


class FakeApi:
    def __init__(self, current=None, error=None):
        self.current, self.error, self.calls = current, error, []

    async def get_rayservice(self, namespace, name):
        self.calls.append(("get", namespace, name))
        if self.error:
            raise self.error
        return copy.deepcopy(self.current)

    async def create_rayservice(self, namespace, body):
        self.calls.append(("create", namespace, body))
        return body

    async def patch_rayservice(self, namespace, name, patch):
        self.calls.append(("patch", namespace, patch))
        return {**self.current, "patched": patch}


@pytest.fixture
def api(monkeypatch):
    def install(**kwargs):
        fake = FakeApi(**kwargs)
        for name in ("get_rayservice", "create_rayservice", "patch_rayservice"):
            monkeypatch.setattr(kube, name, getattr(fake, name))
        return fake

    return install


def _owned(spec):
    desired = render_rayservice("chat", spec)
    kopf.adopt(desired, owner=OWNER)
    desired["metadata"]["resourceVersion"] = "7"
    return desired


async def test_creates_an_adopted_rayservice(api):
    fake = api(current=None)
    action, body = await handlers.apply_rayservice(OWNER, {"replicas": 2}, "chat", "ns")
    assert action == "created"
    (_, (verb, namespace, sent)) = fake.calls
    assert (verb, namespace) == ("create", "ns")
    assert sent["metadata"]["namespace"] == "ns"
    assert sent["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert sent["metadata"]["labels"]["team"] == "a"  # the owner's labels propagate
    assert sent["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "chatstream-operator"


async def test_leaves_an_up_to_date_rayservice_alone(api):
    fake = api(current=_owned({"replicas": 2}))
    action, _ = await handlers.apply_rayservice(OWNER, {"replicas": 2}, "chat", "ns")
    assert action == "unchanged"
    assert [c[0] for c in fake.calls] == ["get"]


async def test_patches_only_the_difference(api):
    fake = api(current=_owned({"replicas": 2}))
    action, _ = await handlers.apply_rayservice(OWNER, {"replicas": 4}, "chat", "ns")
    assert action == "updated"
    (_, (verb, _, patch)) = fake.calls
    assert verb == "patch" and set(patch) == {"spec"}


async def test_refuses_to_take_over_a_foreign_rayservice(api):
    foreign = render_rayservice("chat", {})
    foreign["metadata"]["ownerReferences"] = [
        {"apiVersion": "x/v1", "kind": "Other", "name": "chat", "uid": "u", "controller": True}
    ]
    fake = api(current=foreign)
    # Not for good: the user may delete or rename it, and then the ChatStream is reconciled.
    with pytest.raises(kopf.TemporaryError, match="not controlled by this ChatStream") as error:
        await handlers.apply_rayservice(OWNER, {}, "chat", "ns")
    assert error.value.delay == 60
    assert [c[0] for c in fake.calls] == ["get"]


@pytest.mark.parametrize("deleting", [False, True])
async def test_the_rayservice_of_a_deleted_same_named_chatstream_is_waited_for(api, deleting):
    """Deleted and re-created: the old RayService awaits garbage collection. Retry soon (the
    old code gave up with a PermanentError and never reconciled the new ChatStream)."""
    stale = _owned({})
    stale["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-chatstream"
    if deleting:
        stale["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    fake = api(current=stale)
    with pytest.raises(kopf.TemporaryError, match="deleted ChatStream of the same name") as error:
        await handlers.apply_rayservice(OWNER, {}, "chat", "ns", children=True)
    assert error.value.delay == OperatorOptions().recreate_retry_sec <= 10
    assert [c[0] for c in fake.calls] == ["get"]  # no Secret, no NetworkPolicy, no patch yet


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (kube.NotFound("no such resource"), "is KubeRay installed"),
        (kubernetes.client.ApiException(status=503, reason="Unavailable"), "503"),
    ],
)
async def test_api_failures_are_retried(api, error, match):
    api(error=error)
    with pytest.raises(kopf.TemporaryError, match=match):
        await handlers.apply_rayservice(OWNER, {}, "chat", "ns")


@pytest.fixture
def posted(monkeypatch):
    """Events the handlers post (kopf's poster needs a running operator)."""
    events = []
    monkeypatch.setattr(kopf, "warn", lambda body, **kw: events.append(("Warning", kw)))
    monkeypatch.setattr(kopf, "event", lambda body, **kw: events.append((kw["type"], kw)))
    return events


async def test_the_timer_repairs_drift_and_refreshes_the_status(api, posted, monkeypatch):
    drifted = _owned({"replicas": 2})
    drifted["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = 9
    fake = api(current=drifted)
    written = []

    async def get_chatstream(namespace, name):
        return {**copy.deepcopy(OWNER), "spec": {"replicas": 2}}

    async def patch_chatstream_status(namespace, name, status, resource_version=None):
        written.append(status)

    monkeypatch.setattr(kube, "get_chatstream", get_chatstream)
    monkeypatch.setattr(kube, "patch_chatstream_status", patch_chatstream_status)
    patch = kopf.Patch()
    await handlers.repair_drift(
        body=OWNER, spec={"replicas": 2}, status={}, name="chat", namespace="ns", patch=patch
    )
    (_, (verb, _, sent), *_reads) = fake.calls
    assert verb == "patch"
    assert sent["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2
    assert [(t, e["reason"]) for t, e in posted] == [("Warning", "DriftRepaired")]
    (status,) = written  # through write_status, the one writer of conditions
    assert status["endpoint"] == "http://chat-serve-svc.ns.svc:8000"


async def test_the_timer_leaves_invalid_unreconciled_or_deleting_chatstreams_alone(api, posted):
    fake = api(current=None)
    invalid = {"engine": "mock", "resources": {"gpus": 1}}
    for body, spec in [
        ({**OWNER, "spec": invalid}, invalid),
        # A spec change reconcile has not handled yet is not drift.
        ({**OWNER, "metadata": {**OWNER["metadata"], "generation": 2},
          "status": {"observedGeneration": 1}}, {}),
        ({**OWNER, "metadata": {**OWNER["metadata"], "deletionTimestamp": "2026-01-01"}}, {}),
    ]:  # fmt: skip
        patch = kopf.Patch()
        await handlers.repair_drift(
            body=body, spec=spec, status={}, name="chat", namespace="ns", patch=patch
        )
        assert not patch
    assert fake.calls == [] and posted == []


async def test_gcs_fault_tolerance_is_removed_when_the_spec_drops_it(api):
    with_ft = _owned({"gcsFaultTolerance": {"redisAddress": "redis:6379"}})
    fake = api(current=with_ft)
    action, _ = await handlers.apply_rayservice(OWNER, {}, "chat", "ns")
    assert action == "updated"
    (_, (_, _, patch)) = fake.calls
    assert patch["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] is None
    # Kept while the spec asks for it: no patch at all.
    fake = api(current=with_ft)
    spec = {"gcsFaultTolerance": {"redisAddress": "redis:6379"}}
    assert (await handlers.apply_rayservice(OWNER, spec, "chat", "ns"))[0] == "unchanged"


async def test_a_toleration_change_says_that_running_pods_keep_the_old_ones(api, posted):
    """KubeRay (1.5.2+) leaves tolerations out of its cluster hash: the change reaches new pods
    only, while the status would read Stable. The operator says so, and what to do."""
    api(current=_owned({"replicas": 2}))
    gpu = {"replicas": 2, "resources": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}
    action, _ = await handlers.apply_rayservice(OWNER, gpu, "chat", "ns")
    assert action == "updated"
    ((kind, event),) = posted
    assert (kind, event["reason"]) == ("Warning", "TolerationsNotRolled")
    assert "delete the model pods one at a time" in event["message"]
    posted.clear()
    api(current=_owned({"replicas": 2}))
    await handlers.apply_rayservice(OWNER, {"replicas": 3}, "chat", "ns")
    assert posted == []


async def test_the_follower_never_overwrites_a_newer_status(monkeypatch):
    """The RayService follower writes the status only onto the version it read (resourceVersion
    precondition); on a conflict (reconcile wrote meanwhile) it reads again and recomputes.
    (It reads the ChatStream once to find it, then again in write_status.)"""
    chatstream = {
        **copy.deepcopy(OWNER),
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 1},
    }
    chatstream["metadata"].update(generation=1, resourceVersion="10")
    newer = copy.deepcopy(chatstream)
    newer["metadata"]["resourceVersion"] = "11"
    reads, writes = [chatstream, chatstream, newer], []

    async def get_chatstream(namespace, name):
        return copy.deepcopy(reads.pop(0))

    async def patch_chatstream_status(namespace, name, status, resource_version=None):
        writes.append(resource_version)
        if resource_version == "10":
            raise kube.Conflict("changed")
        return {}

    async def get_rayservice(namespace, name):
        return _owned({"replicas": 2})

    monkeypatch.setattr(kube, "get_chatstream", get_chatstream)
    monkeypatch.setattr(kube, "patch_chatstream_status", patch_chatstream_status)
    monkeypatch.setattr(kube, "get_rayservice", get_rayservice)
    rayservice = _owned({"replicas": 2})
    logger = logging.getLogger("test")
    await handlers.follow_rayservice(
        event={"type": "MODIFIED"}, body=rayservice, namespace="ns", logger=logger, memo=kopf.Memo()
    )
    assert writes == ["10", "11"]


AUTOSCALING = {"autoscaling": {"minReplicas": 1, "maxReplicas": 8}}


def _serving(spec, count):
    """The RayService as KubeRay reports it while Serve autoscaled to `count` replicas."""
    current = _owned(spec)
    cluster = {"desiredWorkerReplicas": count, "readyWorkerReplicas": count}
    current["status"] = {"activeServiceStatus": {"rayClusterStatus": cluster}}
    return current


def _starts(patch):
    """(worker pods, Serve's initial_replicas) a patch sets."""
    config = yaml.safe_load(patch["spec"]["serveConfigV2"])
    model = config["applications"][0]["deployments"][0]
    pods = patch["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]
    return pods, model["autoscaling_config"]["initial_replicas"]


async def test_an_upgrade_starts_the_new_cluster_at_the_current_count(api):
    """Serve autoscaled to 5; an image change starts a new Ray cluster (KubeRay moves all
    traffic to it once it serves): it starts with 5 pods and 5 replicas, not minReplicas."""
    fake = api(current=_serving(AUTOSCALING, 5))
    spec = {**AUTOSCALING, "image": "registry.example.com/ml/chatstream-serve:0.2.0"}
    action, _ = await handlers.apply_rayservice(OWNER, spec, "chat", "ns")
    assert action == "updated"
    (_, (_, _, patch)) = fake.calls
    assert _starts(patch) == (5, 5)


async def test_the_current_count_is_kept_within_new_bounds(api):
    fake = api(current=_serving(AUTOSCALING, 7))
    spec = {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}
    await handlers.apply_rayservice(OWNER, spec, "chat", "ns")
    (_, (_, _, patch)) = fake.calls
    assert _starts(patch) == (4, 4)


async def test_autoscaling_steps_alone_write_nothing(api):
    """Serve's own scaling changes only the reported count: the RayService is not rewritten
    at every step (each write would reset Serve's autoscaling state)."""
    fake = api(current=_serving(AUTOSCALING, 5))
    action, _ = await handlers.apply_rayservice(OWNER, AUTOSCALING, "chat", "ns")
    assert action == "unchanged" and [c[0] for c in fake.calls] == ["get"]
