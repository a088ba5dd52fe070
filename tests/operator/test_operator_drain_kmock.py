"""Issue 13 with the real kopf operator on kmock: scale 3 -> 1, the phases of the scale-down as
KubeRay reports them, and an upgrade.

    create (replicas 3, CI-sized drain bound) -> RayService with upgrade strategy and drain bounds
    KubeRay: running on 3 pods                -> Stable
    kubectl scale --replicas=1                -> one RayService patch: the model's num_replicas
    KubeRay: Serve drains 2 model replicas    -> Progressing ScalingDown (still Ready)
    KubeRay: Serve done, 3 pods, 1 ready      -> Progressing ReleasingPods; the operator leaves
                                                 the pods to Ray's autoscaler (no patch)
    KubeRay: 1 pod                            -> Stable
    new image                                 -> RayService patched; KubeRay: a pending cluster
                                                 -> Progressing Upgrading
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import harness
import pytest
import yaml
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for

pytestmark = pytest.mark.timeout(120)

SPEC: dict[str, Any] = {
    "engine": "mock",
    "replicas": 3,
    "maxOngoingRequests": 2,
    "resources": {"cpus": 1, "memory": "1Gi"},
    "generation": {"maxNewTokens": 200},
    "drain": {"timePerTokenSec": 0.01, "firstTokenSec": 1, "podIdleTimeoutSec": 20},
}


def _ray_status(app: str, model: str, pods: int, ready: int, generation: int) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "serviceStatus": "Running",
        "activeServiceStatus": {
            "applicationStatuses": {
                "chatstream": {
                    "status": app,
                    "serveDeploymentStatuses": {
                        "ChatModel": {"status": model},
                        "ChatStreamIngress": {"status": "HEALTHY"},
                    },
                }
            },
            "rayClusterStatus": {"desiredWorkerReplicas": pods, "readyWorkerReplicas": ready},
        },
    }


async def _scenario() -> dict[str, Any]:
    async with (
        harness._ApiServer() as emulator,
        harness.kmock.Server(emulator, host="127.0.0.1") as server,
    ):
        for resource, info in harness.RESOURCES.items():
            emulator.resources[resource] = harness.kmock.ResourceInfo(verbs=harness.VERBS, **info)
        with harness._kubeconfig(str(server.url)):
            return await _steps(emulator)


async def _steps(emulator: Any) -> dict[str, Any]:
    ns, name = harness.NAMESPACE, harness.NAME
    cs_key, rs_key = (harness.CHATSTREAMS, ns, name), (harness.RAYSERVICES, ns, name)
    cs_path = f"/apis/chatstream.dev/v1alpha1/namespaces/{ns}/chatstreams"
    rs_path = f"/apis/ray.io/v1/namespaces/{ns}/rayservices/{name}"
    headers = {harness.HARNESS_HEADER: "1"}
    seen: dict[str, Any] = {"snapshots": {}, "patches": {}}

    def rayservice() -> dict[str, Any]:
        return harness._plain(emulator.objects[rs_key])

    def status() -> dict[str, Any]:
        return harness._plain(emulator.objects[cs_key]).get("status") or {}

    def progressing() -> tuple[str, str]:
        cond = next(c for c in status()["conditions"] if c["type"] == "Progressing")
        return cond["status"], cond["reason"]

    def rs_patches() -> list[dict[str, Any]]:
        return [
            harness._plain(r.data)
            for r in emulator
            if not harness._is_harness(r)
            and r.resource == harness.RAYSERVICES
            and harness._verb(r) == "patch"
        ]

    async def send(method: str, path: str, body: Any) -> None:
        async with emulator.request(method, path, json=body, headers=headers) as response:
            assert response.status < 400, f"{method} {path}: {response.status}"

    async def step(label: str, action: Any, effect: Any) -> None:
        before = len(rs_patches())
        await action
        await harness._wait(label, effect, 20.0)
        await asyncio.sleep(0.3)  # let late, unwanted reactions show up
        seen["patches"][label] = rs_patches()[before:]
        seen["snapshots"][label] = {"rayservice": rayservice(), "status": status()}

    async def kuberay_reports(app: str, model: str, pods: int, ready: int) -> None:
        generation = rayservice()["metadata"]["generation"]
        body = {"status": _ray_status(app, model, pods, ready, generation)}
        await send("PATCH", f"{rs_path}/status", body)

    async with harness._running_operator(None):
        created = {
            "apiVersion": "chatstream.dev/v1alpha1",
            "kind": "ChatStream",
            "metadata": {"name": name, "namespace": ns, "uid": harness.UID},
            "spec": copy.deepcopy(SPEC),
        }
        await step(
            "create",
            send("POST", cs_path, created),
            lambda: status().get("observedGeneration") == 1 and rayservice(),
        )
        await step(
            "running",
            kuberay_reports("RUNNING", "HEALTHY", 3, 3),
            lambda: status().get("readyReplicas") == 3 and progressing() == ("False", "Stable"),
        )
        await step(
            "scale",
            send("PATCH", f"{cs_path}/{name}", {"spec": {"replicas": 1}}),
            lambda: (
                status().get("observedGeneration") == 2
                and "num_replicas: 1" in rayservice()["spec"]["serveConfigV2"]
            ),
        )
        await step(
            "serve-drains",
            kuberay_reports("DEPLOYING", "DOWNSCALING", 3, 3),
            lambda: progressing() == ("True", "ScalingDown"),
        )
        await step(
            "pods-left",
            kuberay_reports("RUNNING", "HEALTHY", 3, 1),
            lambda: progressing() == ("True", "ReleasingPods"),
        )
        await step(
            "pods-gone",
            kuberay_reports("RUNNING", "HEALTHY", 1, 1),
            lambda: progressing() == ("False", "Stable") and status().get("replicas") == 1,
        )
        await step(
            "new-image",
            send("PATCH", f"{cs_path}/{name}", {"spec": {"image": "chatstream-serve:0.2.0"}}),
            lambda: status().get("observedGeneration") == 3,
        )

        async def upgrading() -> None:
            generation = rayservice()["metadata"]["generation"]
            body = {"status": _ray_status("RUNNING", "HEALTHY", 1, 1, generation)}
            body["status"]["pendingServiceStatus"] = {"rayClusterName": f"{name}-raycluster-b"}
            await send("PATCH", f"{rs_path}/status", body)

        await step("upgrading", upgrading(), lambda: progressing() == ("True", "Upgrading"))
        # Serve autoscales; it runs 4 replicas when the next upgrade comes.
        autoscaling = {"replicas": None, "autoscaling": {"minReplicas": 1, "maxReplicas": 6}}
        await step(
            "autoscaling",
            send("PATCH", f"{cs_path}/{name}", {"spec": autoscaling}),
            lambda: status().get("observedGeneration") == 4,
        )
        await step(
            "autoscaled",
            kuberay_reports("RUNNING", "HEALTHY", 4, 4),
            lambda: status().get("replicas") == 4,
        )
        await step(
            "autoscaled-upgrade",
            send("PATCH", f"{cs_path}/{name}", {"spec": {"image": "chatstream-serve:0.3.0"}}),
            lambda: status().get("observedGeneration") == 5,
        )
    seen["calls"] = [
        c for r in emulator if not harness._is_harness(r) for c in [harness.api_call(r)] if c
    ]
    return seen


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    return asyncio.run(_scenario())


def _app(snapshot: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(snapshot["rayservice"]["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def _deployments(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _app(snapshot)["deployments"]}


def _progressing(snapshot: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in snapshot["status"]["conditions"] if c["type"] == "Progressing")


def _ready(snapshot: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in snapshot["status"]["conditions"] if c["type"] == "Ready")


def test_the_rayservice_carries_the_upgrade_strategy_and_drain_bounds(run):
    rs = run["snapshots"]["create"]["rayservice"]
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] == 6 + 30
    deployments = _deployments(run["snapshots"]["create"])
    assert deployments["ChatModel"]["graceful_shutdown_timeout_s"] == 3
    assert deployments["ChatStreamIngress"]["graceful_shutdown_timeout_s"] == 6
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 20
    validator = validator_for(load_crd(KUBERAY_CRD_PATH), "v1")
    for label, snapshot in run["snapshots"].items():
        assert errors(validator, snapshot["rayservice"]) == [], label


def test_a_scale_changes_only_the_model_replica_count(run):
    before, after = run["snapshots"]["running"], run["snapshots"]["scale"]
    assert _app(before)["args"] == _app(after)["args"]
    old, new = _deployments(before), _deployments(after)
    assert old["ChatStreamIngress"] == new["ChatStreamIngress"]
    assert {k for k in old["ChatModel"] if old["ChatModel"][k] != new["ChatModel"][k]} == {
        "num_replicas"
    }
    (patch,) = run["patches"]["scale"]
    # The worker group's `replicas` is the size of a future cluster only; KubeRay leaves the
    # running cluster's pods to Ray's autoscaler, and nothing names pods to delete.
    assert set(patch["spec"]) <= {"serveConfigV2", "rayClusterConfig"}
    (group,) = after["rayservice"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 1 and group["minReplicas"] == 0
    assert "scaleStrategy" not in group


def test_the_status_shows_each_phase_of_the_scale_down(run):
    snaps = run["snapshots"]
    draining = _progressing(snaps["serve-drains"])
    assert (draining["status"], draining["reason"]) == ("True", "ScalingDown")
    assert "within 3s" in draining["message"]
    assert _ready(snaps["serve-drains"])["status"] == "True"  # the other replica serves
    releasing = _progressing(snaps["pods-left"])
    assert (releasing["status"], releasing["reason"]) == ("True", "ReleasingPods")
    assert "2 worker pods" in releasing["message"] and "20s" in releasing["message"]
    done = _progressing(snaps["pods-gone"])
    assert (done["status"], done["reason"]) == ("False", "Stable")
    assert (
        snaps["pods-gone"]["status"]["replicas"],
        snaps["pods-gone"]["status"]["readyReplicas"],
    ) == (1, 1)


def test_pods_are_left_to_rays_autoscaler(run):
    """While Serve drains and the pods wait to go idle, the operator writes nothing."""
    for label in ("serve-drains", "pods-left", "pods-gone"):
        assert run["patches"][label] == [], label
    resources = {c.resource for c in run["calls"]}
    assert not resources & {"pods", "rayclusters"}


def test_an_image_change_is_an_upgrade(run):
    new = run["snapshots"]["new-image"]["rayservice"]["spec"]["rayClusterConfig"]
    containers = [
        new["headGroupSpec"]["template"]["spec"]["containers"][0],
        new["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
    ]
    assert {c["image"] for c in containers} == {"chatstream-serve:0.2.0"}
    upgrading = _progressing(run["snapshots"]["upgrading"])
    assert (upgrading["status"], upgrading["reason"]) == ("True", "Upgrading")
    assert _ready(run["snapshots"]["upgrading"])["status"] == "True"


def test_an_autoscaled_upgrade_starts_the_new_cluster_at_the_current_count(run):
    """Serve autoscaled to 4 replicas (KubeRay reports 4 worker pods): the new image's new Ray
    cluster starts with 4 pods and Serve with 4 replicas, not autoscaling.minReplicas (1)."""
    assert run["patches"]["autoscaled"] == []  # Serve's own scaling writes nothing
    (patch,) = run["patches"]["autoscaled-upgrade"]
    spec = run["snapshots"]["autoscaled-upgrade"]["rayservice"]["spec"]
    assert "image" in str(patch)
    workers = spec["rayClusterConfig"]["workerGroupSpecs"][0]
    model = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["deployments"][0]
    assert workers["replicas"] == 4
    assert model["autoscaling_config"]["initial_replicas"] == 4
    assert model["autoscaling_config"]["min_replicas"] == 1
