"""Run the real chatstream-operator (kopf) against kmock's Kubernetes API emulator.

One scenario, used by the operator's integration tests and by the chart's RBAC test:

    create a ChatStream -> its RayService appears, owned by it, status written
    scale it (spec.replicas 1 -> 3) -> the RayService follows with one minimal patch
    touch only an annotation -> no RayService patch at all
    KubeRay reports the RayService running -> the ChatStream's status and conditions follow
    someone edits the RayService -> the operator puts it back (drift)
    an invalid spec -> InvalidSpec, RayService untouched, operator still running
    fix the spec -> InvalidSpec cleared
    someone opens the NetworkPolicy, then the spec is touched -> the operator closes it again
    delete the ChatStream -> handled cleanly, operator still running, then stopped

Along the way the operator creates the ChatStream's Secret (signing key, admin token) and the
NetworkPolicy of its Ray pods, both owned by it, and never puts a finalizer on it.

A second scenario (run_recreate_scenario): a Secret of the generated name exists already (left
alone); a ChatStream is re-created while its predecessor's RayService and NetworkPolicy await
garbage collection (reconciled once they are gone); an image outside the allow-list
(InvalidSpec); the operator is uninstalled and the ChatStream deleted (nothing stuck).

Each step waits for its effect and raises AssertionError naming the step if it never comes.

Importable as `harness` from tests/operator or as `tests.operator.harness` from the repo root.

    from tests.operator.harness import ApiCall, run_operator_lifecycle
    calls: list[ApiCall] = await run_operator_lifecycle()              # cluster-wide operator
    calls = await run_operator_lifecycle(namespaces=["chat-harness"])  # namespaced operator
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import os
import pathlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import kmock
import yaml
from kmock._internal import k8s
from kubernetes.config import kube_config

NAMESPACE = "chat-harness"
NAME = "chat"
UID = "0b1c2d3e-0000-4000-8000-000000000001"
CHATSTREAMS = "chatstream.dev/v1alpha1/chatstreams"
RAYSERVICES = "ray.io/v1/rayservices"
SECRETS = "v1/secrets"
NETWORKPOLICIES = "networking.k8s.io/v1/networkpolicies"
PDBS = "policy/v1/poddisruptionbudgets"
LONG_NAME = "chat-" + "x" * 43  # 48 characters: one more than KubeRay takes
HARNESS_HEADER = "X-ChatStream-Harness"  # marks the harness's own calls, which are not recorded

# What the emulator serves: the operator's resources and kopf's own backbone resources.
RESOURCES: dict[str, dict[str, Any]] = {
    CHATSTREAMS: {"kind": "ChatStream", "singular": "chatstream", "namespaced": True,
                  "subresources": {"status", "scale"}},
    RAYSERVICES: {"kind": "RayService", "singular": "rayservice", "namespaced": True,
                  "subresources": {"status"}},
    "v1/events": {"kind": "Event", "singular": "event", "namespaced": True},
    SECRETS: {"kind": "Secret", "singular": "secret", "namespaced": True},
    NETWORKPOLICIES: {"kind": "NetworkPolicy", "singular": "networkpolicy", "namespaced": True},
    PDBS: {"kind": "PodDisruptionBudget", "singular": "poddisruptionbudget", "namespaced": True},
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace", "namespaced": False},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition", "singular": "customresourcedefinition",
        "namespaced": False},
}  # fmt: skip
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}

# What KubeRay reports once the Serve application runs on 3 ready workers.
RAY_READY_STATUS: dict[str, Any] = {
    "serviceStatus": "Running",
    "activeServiceStatus": {
        "applicationStatuses": {
            "chatstream": {
                "status": "RUNNING",
                "serveDeploymentStatuses": {"ChatModel": {"status": "HEALTHY"}},
            }
        },
        "rayClusterStatus": {"readyWorkerReplicas": 3, "desiredWorkerReplicas": 3},
    },
}

SPEC: dict[str, Any] = {
    "engine": "mock",
    "replicas": 1,
    "maxOngoingRequests": 4,
    "maxQueuedRequests": 16,
    "resources": {"cpus": 1, "memory": "1Gi"},
    # A first install's pod surface: a private registry and a model cache.
    "imagePullSecrets": [{"name": "regcred"}],
    "modelCache": {"size": "10Gi", "storageClassName": "standard"},
}


class ApiCall(NamedTuple):
    """One API request the operator made, in the terms of an RBAC rule."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core API
    version: str
    resource: str  # plural, e.g. "rayservices"
    namespaced: bool  # whether the request was made within a namespace
    subresource: str | None  # e.g. "status"; None for the object itself


@dataclasses.dataclass
class LifecycleResult:
    """What the scenario saw: the calls, the objects at each step, events and error logs."""

    calls: list[ApiCall]
    snapshots: dict[str, dict[str, Any]]  # step -> {"chatstream": ..., "rayservice": ...}
    rayservice_patches: dict[str, int]  # step -> PATCH requests on the RayService in that step
    events: list[dict[str, Any]]  # Kubernetes events the operator posted
    error_logs: list[str]  # operator log records at ERROR level or above
    stopped_cleanly: bool
    # The labelSelector of each list or watch of RayServices the operator made ("" for none).
    rayservice_selectors: list[str] = dataclasses.field(default_factory=list)


def _verb(request: kmock.Request) -> str:
    method = str(request.method.value).upper()
    if method == "GET":
        if request.action == kmock.action.WATCH or request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    if method == "DELETE" and not request.name:
        return "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


def api_call(request: kmock.Request) -> ApiCall | None:
    """The RBAC view of one request; None for discovery and other non-resource URLs."""
    res = request.resource
    if res is None or not res.plural:
        return None
    return ApiCall(
        _verb(request),
        res.group or "",
        res.version or "",
        res.plural,
        request.namespace is not None,
        request.subresource or None,
    )


def api_calls(request: kmock.Request) -> list[ApiCall]:
    """The RBAC view of one request, with what admission also checks: where the API server runs
    OwnerReferencesPermissionEnforcement (OpenShift's default), an object whose owner reference
    to a ChatStream sets blockOwnerDeletion needs `update` on `chatstreams/finalizers`."""
    call = api_call(request)
    if call is None:
        return []
    calls = [call]
    data = request.data if isinstance(request.data, dict) else {}
    refs = (data.get("metadata") or {}).get("ownerReferences") or []
    if call.verb in ("create", "update", "patch") and any(
        r.get("blockOwnerDeletion") and r.get("kind") == "ChatStream" for r in refs
    ):
        calls.append(
            ApiCall("update", "chatstream.dev", "v1alpha1", "chatstreams", True, "finalizers")
        )
    return calls


def _is_harness(request: kmock.Request) -> bool:
    return any(k.lower() == HARNESS_HEADER.lower() for k in request.headers)


class _ApiServer(kmock.KubernetesEmulator):
    """kmock plus the API server's bookkeeping that the operator relies on.

    kmock stores objects as sent. A real API server also sets uid, generation and
    resourceVersion, names objects from generateName (kopf's events), bumps generation when the
    spec changes, gives every write a new resourceVersion, and refuses (409 Conflict) a write
    whose `metadata.resourceVersion` is not the object's current one (optimistic concurrency);
    the operator relies on all of these.

    `before_write(request)`, if set, is awaited before each write the operator makes (not the
    harness's own): a test uses it to slow a write down, or to change the world just before it.
    """

    before_write: Callable[[kmock.Request], Awaitable[None]] | None = None

    async def _handle(self, request: kmock.Request) -> Any:
        writes = (kmock.action.CREATE, kmock.action.UPDATE)
        if request.resource is None or request.action not in writes:
            return await super()._handle(request)
        if self.before_write is not None and not _is_harness(request):
            await self.before_write(request)
        # One write at a time, from the precondition check to the stored change.
        async with self._writes:
            data = request.data
            if isinstance(data, dict):
                self._bookkeeping(request, data)
            return await super()._handle(request)

    @functools.cached_property
    def _writes(self) -> asyncio.Lock:
        return asyncio.Lock()

    @functools.cached_property
    def _versions(self) -> Iterator[int]:
        return itertools.count(1)

    def _bookkeeping(self, request: kmock.Request, data: dict[str, Any]) -> None:
        meta = data.setdefault("metadata", {})
        if request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
        else:
            key = (request.resource, request.namespace, request.name)
            stored = self.objects[key] if key in self.objects else None  # noqa: SIM401
            if stored is not None and not stored.deleted:
                current = _plain(stored)["metadata"]
                expected = meta.get("resourceVersion")
                if expected is not None and expected != current.get("resourceVersion"):
                    raise _StaleResourceVersion(
                        message=f"the object has been modified (resourceVersion {expected} "
                        f"is not {current.get('resourceVersion')})"
                    )
                if "spec" in data and not request.subresource:
                    meta["generation"] = (current.get("generation") or 0) + 1
        meta["resourceVersion"] = str(next(self._versions))


@attrs.frozen
class _StaleResourceVersion(k8s.KubernetesError):
    """What the API server answers to a write whose resourceVersion precondition failed."""

    status: int = 409
    reason: str = "Conflict"


def _plain(value: Any) -> Any:
    """A deep copy made of plain dicts and lists (kmock hands out views)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@contextlib.contextmanager
def _kubeconfig(url: str) -> Iterator[None]:
    """Point the operator's normal login (kubeconfig) at the emulator, and only there."""
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                    "users": [{"name": "kmock", "user": {"token": "kmock"}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        os.environ["KUBECONFIG"] = str(path)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)  # never the real cluster
        # The client reads $KUBECONFIG once, at import; later runs need the module global set.
        saved_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
        try:
            yield
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_default
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _ErrorLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.asynccontextmanager
async def _running_operator(
    namespaces: Sequence[str] | None,
    *flags: str,
    recreate_retry_sec: float | None = None,
    dependency_retry_sec: float | None = None,
) -> AsyncIterator[asyncio.Task]:
    """The operator as `chatstream-operator --standalone [-A | -n NS ...] [flags]` runs it."""
    import kopf
    from chatstream_operator import handlers  # noqa: F401  (registers the real handlers)
    from chatstream_operator.__main__ import operator_kwargs, parse_args

    scope = [f"--namespace={ns}" for ns in namespaces] if namespaces else ["--all-namespaces"]
    kwargs = operator_kwargs(parse_args(["--standalone", "--liveness=", *scope, *flags]))
    if recreate_retry_sec is not None:
        options = kwargs["memo"].options
        kwargs["memo"].options = dataclasses.replace(options, recreate_retry_sec=recreate_retry_sec)
    if dependency_retry_sec is not None:
        options = kwargs["memo"].options
        kwargs["memo"].options = dataclasses.replace(
            options, dependency_retry_sec=dependency_retry_sec
        )
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(stop_flag=stop, ready_flag=ready, **kwargs))
    try:
        await asyncio.wait_for(ready.wait(), timeout=30)
        yield task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=15)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _wait(step: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (KeyError, IndexError, TypeError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step!r}: the operator's effect did not show in {timeout}s")
        await asyncio.sleep(0.05)


async def run_lifecycle_scenario(
    *, namespaces: Sequence[str] | None = None, step_timeout: float = 20.0
) -> LifecycleResult:
    """Run the whole scenario once; see the module docstring. Takes about 10 seconds."""
    async with _emulated_api() as emulator:
        return await _scenario(emulator, namespaces, step_timeout)


@contextlib.asynccontextmanager
async def _emulated_api() -> AsyncIterator[_ApiServer]:
    """kmock serving RESOURCES, with the operator's kubeconfig pointing at it."""
    async with (
        _ApiServer() as emulator,
        kmock.Server(emulator, host="127.0.0.1") as server,
    ):
        for resource, info in RESOURCES.items():
            emulator.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)
        with _kubeconfig(str(server.url)):
            yield emulator


async def _scenario(
    emulator: _ApiServer, namespaces: Sequence[str] | None, timeout: float
) -> LifecycleResult:
    cs_key, rs_key = (CHATSTREAMS, NAMESPACE, NAME), (RAYSERVICES, NAMESPACE, NAME)
    cs_path = f"/apis/chatstream.dev/v1alpha1/namespaces/{NAMESPACE}/chatstreams"
    rs_path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/{NAME}"
    headers = {HARNESS_HEADER: "1"}
    snapshots: dict[str, dict[str, Any]] = {}
    rs_patches: dict[str, int] = {}

    def chatstream() -> dict[str, Any]:
        return _plain(emulator.objects[cs_key])

    def rayservice() -> dict[str, Any]:
        return _plain(emulator.objects[rs_key])

    def child(resource: str, name: str) -> dict[str, Any] | None:
        try:
            return _plain(emulator.objects[resource, NAMESPACE, name])
        except KeyError:
            return None

    def status() -> dict[str, Any]:
        return chatstream().get("status") or {}

    def condition(type_: str) -> dict[str, Any]:
        return next((c for c in status().get("conditions", []) if c["type"] == type_), {})

    def worker_replicas() -> int:
        return rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"]

    def count_rs_patches() -> int:
        return sum(
            1
            for r in emulator
            if not _is_harness(r) and r.resource == RAYSERVICES and _verb(r) == "patch"
        )

    async def send(method: str, path: str, body: Any) -> None:
        async with emulator.request(method, path, json=body, headers=headers) as response:
            assert response.status < 400, f"{method} {path}: {response.status}"

    async def step(name: str, action: Awaitable[None], effect: Callable[[], Any]) -> None:
        before = count_rs_patches()
        await action
        await _wait(name, effect, timeout)
        await asyncio.sleep(0.3)  # let late, unwanted reactions show up in the counts
        rs_patches[name] = count_rs_patches() - before
        snapshots[name] = {
            "chatstream": chatstream(),
            "rayservice": rayservice(),
            "secret": child(SECRETS, f"{NAME}-chatstream"),
            "networkpolicy": child(NETWORKPOLICIES, f"{NAME}-ray"),
            "disruptionbudget": child(PDBS, f"{NAME}-model"),
        }

    errors = _ErrorLogs()
    logging.getLogger().addHandler(errors)
    stopped = False
    try:
        async with _running_operator(namespaces) as task:
            created = {
                "apiVersion": "chatstream.dev/v1alpha1",
                "kind": "ChatStream",
                "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID},
                "spec": copy.deepcopy(SPEC),
            }
            await step(
                "create",
                send("POST", cs_path, created),
                lambda: status().get("observedGeneration") == 1 and rayservice(),
            )
            await step(
                "scale",
                send("PATCH", f"{cs_path}/{NAME}", {"spec": {"replicas": 3}}),
                lambda: worker_replicas() == 3 and status().get("observedGeneration") == 2,
            )
            touch = {"metadata": {"annotations": {"example.com/touched": "yes"}}}
            await step(
                "no-op",
                send("PATCH", f"{cs_path}/{NAME}", touch),
                lambda: status().get("reconcile", {}).get("action") == "unchanged",
            )
            generation = rayservice()["metadata"]["generation"]
            ray_ready = {**RAY_READY_STATUS, "observedGeneration": generation}
            await step(
                "ray-ready",
                send("PATCH", f"{rs_path}/status", {"status": ray_ready}),
                lambda: (
                    status().get("readyReplicas") == 3 and condition("Ready")["status"] == "True"
                ),
            )
            groups = rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            groups[0]["replicas"] = 7  # someone edits the RayService by hand
            await step(
                "drift",
                send(
                    "PATCH", rs_path, {"spec": {"rayClusterConfig": {"workerGroupSpecs": groups}}}
                ),
                lambda: worker_replicas() == 3,
            )
            bad = {"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}
            await step(
                "invalid",
                send("PATCH", f"{cs_path}/{NAME}", bad),
                lambda: (
                    condition("InvalidSpec")["status"] == "True"
                    and status().get("observedGeneration") == 3
                ),
            )
            assert not task.done(), "the operator stopped after an invalid spec"
            # The emulator applies no schema (like an old CRD): the operator checks it itself.
            unchecked = {"spec": {"autoscaling": None, "replicas": -5}}
            await step(
                "unchecked",
                send("PATCH", f"{cs_path}/{NAME}", unchecked),
                lambda: (
                    "spec.replicas" in condition("InvalidSpec").get("message", "")
                    and status().get("observedGeneration") == 4
                ),
            )
            await step(
                "fixed",
                send("PATCH", f"{cs_path}/{NAME}", {"spec": {"replicas": 3}}),
                lambda: (
                    condition("InvalidSpec")["status"] == "False"
                    and status().get("observedGeneration") == 5
                ),
            )
            np_path = (
                f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/{NAME}-ray"
            )

            async def open_the_policy() -> None:
                # Someone admits everything to every port, and lets every model pod be evicted
                # at once; the next reconcile puts both back.
                await send("PATCH", np_path, {"spec": {"ingress": [{}]}})
                pdb_path = f"/apis/policy/v1/namespaces/{NAMESPACE}/poddisruptionbudgets"
                await send("PATCH", f"{pdb_path}/{NAME}-model", {"spec": {"maxUnavailable": 9}})
                touch = {"metadata": {"annotations": {"example.com/touched": "again"}}}
                await send("PATCH", f"{cs_path}/{NAME}", touch)

            await step(
                "policy-drift",
                open_the_policy(),
                lambda: (
                    {} not in child(NETWORKPOLICIES, f"{NAME}-ray")["spec"]["ingress"]
                    and child(PDBS, f"{NAME}-model")["spec"]["maxUnavailable"] == 1
                ),
            )
            errors_before_delete = len(errors.messages)
            async with emulator.request("DELETE", f"{cs_path}/{NAME}", headers=headers) as resp:
                assert resp.status < 400, f"DELETE: {resp.status}"
            await _wait("delete", lambda: emulator.objects[cs_key].deleted, timeout)
            await asyncio.sleep(1.0)  # the operator sees the deletion and must stay calm
            assert not task.done(), "the operator stopped after the ChatStream was deleted"
            assert errors.messages[errors_before_delete:] == [], "errors after the deletion"
        stopped = task.done() and not task.cancelled() and task.exception() is None
    finally:
        logging.getLogger().removeHandler(errors)

    calls = [c for r in emulator if not _is_harness(r) for c in api_calls(r)]
    events = [
        _plain(r.data) for r in emulator if r.resource == "v1/events" and _verb(r) == "create"
    ]
    selectors = [
        str(r.params.get("labelSelector") or "")
        for r in emulator
        if not _is_harness(r) and r.resource == RAYSERVICES and _verb(r) in ("list", "watch")
    ]
    return LifecycleResult(
        calls, snapshots, rs_patches, events, errors.messages, stopped, selectors
    )


async def run_operator_lifecycle(*, namespaces: Sequence[str] | None = None) -> list[ApiCall]:
    """Run the scenario against kmock and return every API call the operator made, in order.

    Signature: `async def run_operator_lifecycle(*, namespaces: Sequence[str] | None = None)
    -> list[ApiCall]`, where `ApiCall` is the NamedTuple
    `(verb, group, version, resource, namespaced, subresource)`: `verb` is the Kubernetes RBAC
    verb (get, list, watch, create, update, patch, delete), `group` is "" for the core API,
    `resource` the plural, `namespaced` whether the request was namespace-scoped, `subresource`
    e.g. "status" or None. `namespaces=None` runs the operator cluster-wide (`--all-namespaces`);
    a list runs it for those namespaces only (the objects live in NAMESPACE). Discovery requests
    (/api, /apis/...) are left out: every authenticated user may make them. The harness's own
    requests (which stand in for kubectl and KubeRay) are left out too.
    Raises AssertionError if any step of the scenario fails.
    """
    return (await run_lifecycle_scenario(namespaces=namespaces)).calls


@dataclasses.dataclass
class RecreateResult:
    """What run_recreate_scenario saw."""

    secret_before: dict[str, Any]  # the pre-existing Secret of the generated name
    secret_after: dict[str, Any] | None  # the same Secret once the operator reconciled
    waiting: dict[str, Any]  # the old RayService while the new ChatStream waits for it to go
    waiting_status: dict[str, Any]  # the new ChatStream's status meanwhile
    rayservice: dict[str, Any]  # the new ChatStream's RayService, once created
    networkpolicy: dict[str, Any]  # the new ChatStream's NetworkPolicy, once created
    new_uid: str
    invalid_image: dict[str, Any]  # the ChatStream with an image outside the allow-list
    invalid_image_rayservice: dict[str, Any] | None  # its RayService (none, it must be)
    invalid_name: dict[str, Any]  # a ChatStream whose name KubeRay refuses
    invalid_name_rayservice: dict[str, Any] | None  # its RayService (none)
    finalizers: list[str]  # metadata.finalizers of the reconciled ChatStream
    gone_after_uninstall: bool  # deleted with no operator running: gone at once, not stuck
    operator_survived: bool


async def run_recreate_scenario(
    *, allowed_images: str = "registry.example.com/ml", step_timeout: float = 20.0
) -> RecreateResult:
    """A ChatStream is deleted and re-created under the same name while its old RayService and
    NetworkPolicy await garbage collection; the harness then plays the garbage collector. A
    Secret of the generated name exists beforehand (the operator must leave it alone). A second
    ChatStream names an image outside the allow-list. Then the operator is uninstalled (stopped)
    and the ChatStream deleted: nothing may keep it in Terminating."""
    async with _emulated_api() as emulator:
        return await _recreate(emulator, allowed_images, step_timeout)


async def _recreate(emulator: _ApiServer, allowed_images: str, timeout: float) -> RecreateResult:
    ns_api, ns_apis = f"/api/v1/namespaces/{NAMESPACE}", f"/apis/{{}}/namespaces/{NAMESPACE}"
    cs_path = ns_apis.format("chatstream.dev/v1alpha1") + "/chatstreams"
    rs_path = ns_apis.format("ray.io/v1") + "/rayservices"
    np_path = ns_apis.format("networking.k8s.io/v1") + "/networkpolicies"
    headers = {HARNESS_HEADER: "1"}
    old_uid, new_uid = f"{UID[:-1]}a", f"{UID[:-1]}b"
    image = f"{allowed_images.split(',')[0]}/chatstream-serve:1.0"

    async def send(method: str, path: str, body: Any = None) -> None:
        async with emulator.request(method, path, json=body, headers=headers) as response:
            assert response.status < 400, f"{method} {path}: {response.status}"

    def get(resource: str, name: str) -> dict[str, Any] | None:
        try:
            obj = emulator.objects[resource, NAMESPACE, name]
        except KeyError:
            return None
        return None if obj.deleted else _plain(obj)

    def owned_by(uid: str) -> list[dict[str, Any]]:
        return [{"apiVersion": "chatstream.dev/v1alpha1", "kind": "ChatStream", "name": NAME,
                 "uid": uid, "controller": True, "blockOwnerDeletion": True}]  # fmt: skip

    def chatstream(name: str, uid: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "chatstream.dev/v1alpha1", "kind": "ChatStream",
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid},
                "spec": spec}  # fmt: skip

    # What the deleted predecessor left behind, awaiting garbage collection.
    secret_name = f"{NAME}-chatstream"
    existing = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": secret_name, "namespace": NAMESPACE},
                "data": {"session-secret": "a2VwdA==", "admin-token": "a2VwdA=="}}  # fmt: skip
    await send("POST", f"{ns_api}/secrets", existing)
    old_rs = {"apiVersion": "ray.io/v1", "kind": "RayService",
              "metadata": {"name": NAME, "namespace": NAMESPACE,
                           "ownerReferences": owned_by(old_uid),
                           "labels": {"app.kubernetes.io/managed-by": "chatstream-operator",
                                      "chatstream.dev/name": NAME}},
              "spec": {"serveConfigV2": "old"}}  # fmt: skip
    await send("POST", rs_path, old_rs)
    old_np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": f"{NAME}-ray", "namespace": NAMESPACE,
                           "ownerReferences": owned_by(old_uid)},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}  # fmt: skip
    await send("POST", np_path, old_np)
    secret_before = get(SECRETS, secret_name)
    assert secret_before is not None

    errors = _ErrorLogs()
    logging.getLogger().addHandler(errors)
    try:
        async with _running_operator(
            None, f"--allowed-image-repository={allowed_images}", recreate_retry_sec=0.5
        ) as task:
            spec = {**copy.deepcopy(SPEC), "image": image}
            await send("POST", cs_path, chatstream(NAME, new_uid, spec))
            bad = {**copy.deepcopy(SPEC), "image": "evil.example.com/miner:1"}
            await send("POST", cs_path, chatstream("evil", str(uuid.uuid4()), bad))
            # A name KubeRay refuses for the RayService (over 47 characters).
            spec_ok = {**copy.deepcopy(SPEC), "image": image}
            await send("POST", cs_path, chatstream(LONG_NAME, str(uuid.uuid4()), spec_ok))
            await _wait(
                "waiting for the old RayService",
                lambda: any("deleted ChatStream of the same name" in m for m in errors.messages),
                timeout,
            )
            await asyncio.sleep(1.0)  # a few retries: still waiting, nothing taken over
            waiting = get(RAYSERVICES, NAME)
            # KubeRay reports on the old RayService: not the new ChatStream's business.
            await send("PATCH", f"{rs_path}/{NAME}/status", {"status": RAY_READY_STATUS})
            await asyncio.sleep(0.5)
            waiting_status = get(CHATSTREAMS, NAME).get("status") or {}
            # The garbage collector removes the predecessor's objects.
            await send("DELETE", f"{rs_path}/{NAME}")
            await send("DELETE", f"{np_path}/{NAME}-ray")

            def created(resource: str, name: str) -> dict[str, Any] | None:
                obj = get(resource, name)
                owner = ((obj or {}).get("metadata", {}).get("ownerReferences") or [{}])[0]
                return obj if owner.get("uid") == new_uid else None

            rayservice = await _wait("re-created", lambda: created(RAYSERVICES, NAME), timeout)
            policy = await _wait("policy", lambda: created(NETWORKPOLICIES, f"{NAME}-ray"), timeout)

            def invalid(name: str = "evil") -> dict[str, Any] | None:
                obj = get(CHATSTREAMS, name)
                conds = ((obj or {}).get("status") or {}).get("conditions") or []
                return obj if any(c["type"] == "InvalidSpec" and c["status"] == "True"
                                  for c in conds) else None  # fmt: skip

            invalid_image = await _wait("invalid image", invalid, timeout)
            invalid_name = await _wait("invalid name", lambda: invalid(LONG_NAME), timeout)
            await asyncio.sleep(0.5)
            finalizers = list(get(CHATSTREAMS, NAME)["metadata"].get("finalizers") or [])
            survived = not task.done()
        # Uninstalled: no operator runs any more. The user deletes the ChatStream.
        await send("DELETE", f"{cs_path}/{NAME}")
        await asyncio.sleep(0.2)
        gone = get(CHATSTREAMS, NAME) is None
    finally:
        logging.getLogger().removeHandler(errors)
    return RecreateResult(
        secret_before=secret_before,
        secret_after=get(SECRETS, secret_name),
        waiting=waiting,
        waiting_status=waiting_status,
        rayservice=rayservice,
        networkpolicy=policy,
        new_uid=new_uid,
        invalid_image=invalid_image,
        invalid_image_rayservice=get(RAYSERVICES, "evil"),
        invalid_name=invalid_name,
        invalid_name_rayservice=get(RAYSERVICES, LONG_NAME),
        finalizers=finalizers,
        gone_after_uninstall=gone,
        operator_survived=survived,
    )


@dataclasses.dataclass
class StatusRaceResult:
    """What run_status_race_scenario saw."""

    status: dict[str, Any]  # the ChatStream's status once things settled
    rayservice_status: dict[str, Any]  # what KubeRay last reported on the RayService
    delayed_write: bool  # whether the race was staged (a status write was held back)
    # Per status write of the operator that set conditions: whether it named a resourceVersion.
    condition_writes: list[bool]


async def run_status_race_scenario(*, settle_sec: float = 8.0) -> StatusRaceResult:
    """Two writers of one status: the reconcile handler (after a spec change) and the RayService
    follower (after KubeRay's report). The harness stages the race that loses an update without
    a precondition: just as the operator's first status write after the spec change reaches the
    API server, KubeRay reports the Serve application RUNNING on the RayService, and that write
    is held back for a second, so the follower handles KubeRay's report first. Then the harness
    waits (at most `settle_sec`) for the ChatStream to say Ready, as the RayService does."""
    async with _emulated_api() as emulator:
        return await _status_race(emulator, settle_sec)


async def _status_race(emulator: _ApiServer, settle_sec: float) -> StatusRaceResult:
    headers = {HARNESS_HEADER: "1"}
    cs_path = f"/apis/chatstream.dev/v1alpha1/namespaces/{NAMESPACE}/chatstreams"
    rs_path = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/{NAME}"
    staged = {"armed": False, "done": False}

    async def send(method: str, path: str, body: Any) -> None:
        async with emulator.request(method, path, json=body, headers=headers) as response:
            assert response.status < 400, f"{method} {path}: {response.status}"

    def get(resource: str) -> dict[str, Any]:
        obj = emulator.objects[resource, NAMESPACE, NAME]
        return {} if obj.deleted else _plain(obj)

    def status() -> dict[str, Any]:
        return get(CHATSTREAMS).get("status") or {}

    def ready() -> bool:
        conds = status().get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    async def before_write(request: kmock.Request) -> None:
        if not staged["armed"] or staged["done"]:
            return
        if request.resource == CHATSTREAMS and request.subresource == "status":
            staged["done"] = True
            generation = get(RAYSERVICES)["metadata"].get("generation")
            report = {**RAY_READY_STATUS, "observedGeneration": generation}
            await send("PATCH", f"{rs_path}/status", {"status": report})
            await asyncio.sleep(1.0)  # the follower handles KubeRay's report meanwhile

    emulator.before_write = before_write
    async with _running_operator(None):
        created = {
            "apiVersion": "chatstream.dev/v1alpha1",
            "kind": "ChatStream",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID},
            "spec": copy.deepcopy(SPEC),
        }
        await send("POST", cs_path, created)
        await _wait("create", lambda: status().get("observedGeneration") == 1, 20)
        await asyncio.sleep(0.5)  # the follower's writes after the creation are done
        staged["armed"] = True
        await send("PATCH", f"{cs_path}/{NAME}", {"spec": {"replicas": 3}})
        await _wait("spec change handled", lambda: status().get("observedGeneration") == 2, 20)
        deadline = time.monotonic() + settle_sec
        while not ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    # The operator's status writes that set conditions, and whether each carried a precondition.
    condition_writes = [
        (r.data.get("metadata") or {}).get("resourceVersion") is not None
        for r in emulator
        if r.resource == CHATSTREAMS and r.subresource == "status" and _verb(r) == "patch"
        and not _is_harness(r) and isinstance(r.data, dict)
        and "conditions" in (r.data.get("status") or {})
    ]  # fmt: skip
    return StatusRaceResult(
        status=status(),
        rayservice_status=get(RAYSERVICES).get("status") or {},
        delayed_write=staged["done"],
        condition_writes=condition_writes,
    )


GATEWAY_RESOURCES = {
    "gateway.networking.k8s.io/v1/gateways": {"kind": "Gateway", "singular": "gateway"},
    "gateway.networking.k8s.io/v1/httproutes": {"kind": "HTTPRoute", "singular": "httproute"},
}
INCREMENTAL = {
    "type": "NewClusterWithIncrementalUpgrade",
    "clusterUpgradeOptions": {
        "gatewayClassName": "istio",
        "stepSizePercent": 25,
        "intervalSeconds": 60,
    },
}


@dataclasses.dataclass
class GatewayResult:
    """What run_gateway_scenario saw."""

    refused: dict[str, Any]  # the ChatStream while the cluster lacks the Gateway API
    refused_rayservice: dict[str, Any] | None  # its RayService meanwhile (none)
    events: list[dict[str, Any]]  # the events posted meanwhile
    accepted: dict[str, Any]  # the ChatStream once the Gateway API is installed
    rayservice: dict[str, Any]  # its RayService then


async def run_gateway_scenario(*, step_timeout: float = 20.0) -> GatewayResult:
    """A ChatStream asks for NewClusterWithIncrementalUpgrade in a cluster without the Gateway
    API: refused (InvalidSpec, an event naming what to install), no RayService. The Gateway API
    CRDs are then installed (kmock starts serving gateways and httproutes): the operator, which
    checks again, renders the RayService without any edit of the spec."""
    async with _emulated_api() as emulator:
        cs_path = f"/apis/chatstream.dev/v1alpha1/namespaces/{NAMESPACE}/chatstreams"
        headers = {HARNESS_HEADER: "1"}

        def get(resource: str) -> dict[str, Any] | None:
            try:
                obj = emulator.objects[resource, NAMESPACE, NAME]
            except KeyError:
                return None
            return None if obj.deleted else _plain(obj)

        def invalid_spec() -> dict[str, Any]:
            conds = ((get(CHATSTREAMS) or {}).get("status") or {}).get("conditions") or []
            return next((c for c in conds if c["type"] == "InvalidSpec"), {})

        async with _running_operator(None, dependency_retry_sec=0.5):
            spec = {**copy.deepcopy(SPEC), "upgradeStrategy": INCREMENTAL}
            body = {"apiVersion": "chatstream.dev/v1alpha1", "kind": "ChatStream",
                    "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID},
                    "spec": spec}  # fmt: skip
            async with emulator.request("POST", cs_path, json=body, headers=headers) as resp:
                assert resp.status < 400
            await _wait("refused", lambda: invalid_spec().get("status") == "True", step_timeout)
            await asyncio.sleep(1.0)  # a few checks again: still refused, nothing rendered
            refused, refused_rs = get(CHATSTREAMS), get(RAYSERVICES)
            events = [
                _plain(r.data)
                for r in emulator
                if r.resource == "v1/events" and _verb(r) == "create"
            ]
            for resource, info in GATEWAY_RESOURCES.items():
                emulator.resources[resource] = kmock.ResourceInfo(
                    verbs=VERBS, namespaced=True, **info
                )
            rayservice = await _wait("accepted", lambda: get(RAYSERVICES), step_timeout)
            await _wait("valid", lambda: invalid_spec().get("status") == "False", step_timeout)
            accepted = get(CHATSTREAMS)
    return GatewayResult(refused, refused_rs, events, accepted, rayservice)
