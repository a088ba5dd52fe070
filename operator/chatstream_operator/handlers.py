"""kopf handlers: a thin layer over the pure `render`, `patching` and `status` modules.

- reconcile (create/resume/update): validate, render, adopt, create or minimally patch the
  RayService, write the ChatStream's status; an invalid spec only sets InvalidSpec.
- follow_rayservice (RayService events): undo edits made to the RayService behind our back
  (drift) and copy its state into the ChatStream's status.
- repair_drift (timer, only with --drift-interval > 0): the same apply now and then.

The operator's flags reach the handlers as kopf's `memo` (options.py), never the environment.

No finalizer by default: kopf adds one only for timers, so without the timer nothing keeps a
deleted ChatStream in Terminating when the operator is gone (uninstalled, scaled to zero).
Garbage collection removes the RayService, the NetworkPolicy and the generated Secret.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf
import kubernetes

from . import (
    COMPONENT_LABEL,
    GROUP,
    KIND,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    OPERATOR_NAME,
    PLURAL,
    RAY_GROUP,
    RAY_PLURAL,
    RAY_VERSION,
    VERSION,
    kube,
    replicas,
)
from .credentials import generated_secret_name, render_generated_secret
from .disruption import disruption_budget_name, render_disruption_budget
from .network import network_policy_name, render_network_policy
from .options import OperatorOptions, options_of
from .patching import merge_patch
from .render import render_rayservice
from .spec import (
    GATEWAY_API_GROUP,
    GATEWAY_API_VERSION,
    gateway_api_problem,
    needs_gateway_api,
    validate,
)
from .status import INVALID_SPEC, derive_status, now_iso, set_condition, status_changes

# The label every RayService the operator renders carries (render.labels).
OWN_RAYSERVICES = f"{MANAGED_BY_LABEL}={OPERATOR_NAME}"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in our own annotation namespace, not in .status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # kopf puts a finalizer on objects with timers, to stop the timer before the object goes.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Our events carry reasons (Created, Updated, InvalidSpec, ...); kopf's per-log-line events
    # would drown them, so only its warnings and errors become events.
    settings.posting.level = logging.WARNING
    # The API server sends only our RayServices (labelSelector on the list and the watch), not
    # every RayService in scope for kopf to drop; the handler's `labels=` filter stays as well.
    settings.watching.label_selectors[RAY_GROUP, RAY_VERSION, RAY_PLURAL] = OWN_RAYSERVICES


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # One set of credentials for kopf and for our own `kubernetes` client calls: this loads the
    # in-cluster service account (or kubeconfig) into the client's default configuration.
    return kopf.login_via_client(**kwargs)


def _controlled_by(child: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    """Whether `owner` (this very object: same name and uid) is the child's controller."""
    meta = owner.get("metadata", {})
    for ref in child.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND:
            return (ref.get("name"), ref.get("uid")) == (meta.get("name"), meta.get("uid"))
    return False


def _check_controller(
    child: Mapping[str, Any], owner: Mapping[str, Any], what: str, retry_sec: float
) -> None:
    """Refuse, for now, a child this ChatStream does not control. A child of an earlier
    ChatStream of the same name (deleted and re-created) is garbage soon: retry shortly, so the
    new one is reconciled once the old child is gone. Another owner's: retry now and then (the
    user may delete or rename it), never give up for good."""
    if _controlled_by(child, owner):
        return
    name = owner.get("metadata", {}).get("name")
    refs = child.get("metadata", {}).get("ownerReferences") or []
    ours = [r for r in refs if r.get("controller") and r.get("kind") == KIND]
    if child.get("metadata", {}).get("deletionTimestamp") or (ours and ours[0].get("name") == name):
        raise kopf.TemporaryError(
            f"{what} {name} belongs to a deleted ChatStream of the same name; waiting for "
            "garbage collection to remove it",
            delay=retry_sec,
        )
    raise kopf.TemporaryError(
        f"{what} {name} exists but is not controlled by this ChatStream; delete or rename it",
        delay=60,
    )


async def ensure_secret(body: Mapping[str, Any], spec: Mapping[str, Any], name: str) -> str:
    """Create the generated Secret (signing key, admin token) if the spec needs it.
    Returns created|exists|unneeded. An existing Secret of that name is left as it is: the
    operator cannot read Secrets (RBAC: create only), and never rewrites keys."""
    secret = render_generated_secret(name, spec)
    if secret is None:
        return "unneeded"
    kopf.adopt(secret, owner=body)  # type: ignore[arg-type]
    namespace = secret["metadata"]["namespace"]
    try:
        with _api_errors():
            await kube.create_secret(namespace, secret)
    except kube.AlreadyExists:
        return "exists"
    kopf.event(
        body,
        type="Normal",
        reason="SecretCreated",
        message=f"Secret {generated_secret_name(name)} created (session-secret, admin-token)",
    )
    return "created"


async def apply_network_policy(
    body: Mapping[str, Any], name: str, namespace: str, options: OperatorOptions
) -> str:
    """Create or minimally patch the NetworkPolicy of the Ray pods (see network.py)."""
    if not options.network_policy:
        return "disabled"
    desired = render_network_policy(
        name, list(options.control_plane_peers), list(options.metrics_peers)
    )
    kopf.adopt(desired, owner=body)  # type: ignore[arg-type]
    with _api_errors():
        current = await kube.get_network_policy(namespace, network_policy_name(name))
        if current is None:
            await kube.create_network_policy(namespace, desired)
            return "created"
        _check_controller(current, body, "NetworkPolicy", options.recreate_retry_sec)
        changes = merge_patch(current, desired)
        if not changes:
            return "unchanged"
        await kube.patch_network_policy(namespace, network_policy_name(name), changes)
        return "updated"


async def apply_disruption_budget(body: Mapping[str, Any], name: str, namespace: str) -> str:
    """Create or minimally patch the model pods' PodDisruptionBudget (see disruption.py)."""
    desired = render_disruption_budget(name)
    kopf.adopt(desired, owner=body)  # type: ignore[arg-type]
    budget = disruption_budget_name(name)
    with _api_errors():
        current = await kube.get_disruption_budget(namespace, budget)
        if current is None:
            await kube.create_disruption_budget(namespace, desired)
            return "created"
        if not _controlled_by(current, body):
            return "foreign"  # someone else's budget of that name: left alone
        changes = merge_patch(current, desired)
        if not changes:
            return "unchanged"
        await kube.patch_disruption_budget(namespace, budget, changes)
        return "updated"


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """API failures are worth a retry; a missing RayService CRD means KubeRay is not installed."""
    try:
        yield
    except kube.NotFound as e:
        raise kopf.TemporaryError(
            f"RayService API not found ({e}): is KubeRay installed?", delay=60
        ) from e
    except kubernetes.client.ApiException as e:
        raise kopf.TemporaryError(f"API call failed: {e.status} {e.reason}", delay=10) from e


async def apply_rayservice(
    body: Mapping[str, Any],
    spec: Mapping[str, Any],
    name: str,
    namespace: str,
    *,
    children: bool = False,
    options: OperatorOptions = OperatorOptions(),  # noqa: B008  (frozen: never mutated)
) -> tuple[str, dict[str, Any]]:
    """Create or minimally patch the RayService. Returns (created|updated|unchanged, object).
    With `children`, first the generated Secret and the NetworkPolicy (once the RayService is
    known to be this ChatStream's or absent), so that the pods find their Secret at once."""
    with _api_errors():
        # Always the fresh object: a patch computed from a stale event would undo newer changes.
        current = await kube.get_rayservice(namespace, name)
    if current is not None:
        _check_controller(current, body, "RayService", options.recreate_retry_sec)
    desired = _desired_rayservice(body, name, spec, current)
    if children:
        # The NetworkPolicy first: one left by a deleted predecessor is waited for like its
        # RayService, which also gives garbage collection time for its Secret (unreadable here).
        await apply_network_policy(body, name, namespace, options)
        await apply_disruption_budget(body, name, namespace)
        await ensure_secret(body, spec, name)
    with _api_errors():
        if current is None:
            return "created", await kube.create_rayservice(namespace, desired)
        changes = merge_patch(current, _with_removals(current, desired))
        if not changes:
            return "unchanged", current
        updated = await kube.patch_rayservice(namespace, name, changes)
    if _tolerations(current) != _tolerations(desired):
        kopf.warn(
            body,  # type: ignore[arg-type]
            reason="TolerationsNotRolled",
            message=(
                "KubeRay applies changed tolerations to new pods only (they are outside its "
                "cluster hash): the running Ray pods keep the old ones. To move them, delete "
                "the model pods one at a time (kubectl get pods -l "
                f"{NAME_LABEL}={name},{COMPONENT_LABEL}=model; kubectl delete pod POD) or change "
                "a field that starts a new Ray cluster"
            ),
        )
    return "updated", updated


def _desired_rayservice(
    body: Mapping[str, Any], name: str, spec: Mapping[str, Any], current: dict[str, Any] | None
) -> dict[str, Any]:
    """The rendering to apply. With autoscaling, a RayService that needs no other change keeps
    the starting count it has (no write at every autoscaling step); one that changes (a new
    Ray cluster, a reconfigured deployment) starts at the count that serves now (replicas.py)."""
    kept = render_rayservice(name, spec, replicas.rendered_start(current))
    kopf.adopt(kept, owner=body)  # type: ignore[arg-type]  # a plain dict owner works too
    if current is None or not merge_patch(current, _with_removals(current, copy.deepcopy(kept))):
        return kept
    desired = render_rayservice(name, spec, replicas.current_count(current))
    kopf.adopt(desired, owner=body)  # type: ignore[arg-type]
    return desired


# Fields the renderer sets only when the spec asks for them: absent in the rendering means
# absent in the cluster (a None in the desired object becomes a deletion in the merge patch).
OPTIONAL_FIELDS = (("spec", "rayClusterConfig", "gcsFaultToleranceOptions"),)


def _with_removals(current: Mapping[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    for *parents, key in OPTIONAL_FIELDS:
        have: Any = current
        want: Any = desired
        for part in parents:
            have = have.get(part) if isinstance(have, Mapping) else None
            want = want.get(part) if isinstance(want, dict) else None
        if isinstance(have, Mapping) and key in have and isinstance(want, dict):
            want.setdefault(key, None)
    return desired


def _tolerations(rayservice: Mapping[str, Any]) -> list[Any]:
    """The head's and the worker groups' tolerations, in order."""
    cluster = (rayservice.get("spec") or {}).get("rayClusterConfig") or {}
    groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
    return [((g.get("template") or {}).get("spec") or {}).get("tolerations") or [] for g in groups]


def _deleting(body: Mapping[str, Any]) -> bool:
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


def _repairable(body: Mapping[str, Any], options: OperatorOptions) -> bool:
    """Whether a difference to the rendered RayService is drift: the spec was reconciled
    (its generation observed), is valid, and the ChatStream is not being deleted. A spec change
    that reconcile has not handled yet is reconcile's job, not a repair."""
    meta, status = body.get("metadata", {}), body.get("status") or {}
    refused = any(
        c.get("type") == INVALID_SPEC and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return (
        status.get("observedGeneration") == meta.get("generation")
        and not refused  # also what validate cannot see (a missing Gateway API)
        and not validate(
            body.get("spec") or {}, options.allowed_image_repositories, meta.get("name")
        )
        and not _deleting(body)
    )


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> dict[str, str]:
    options = options_of(memo)
    generation = meta.get("generation")
    problems = validate(spec, options.allowed_image_repositories, name)
    if problems:
        message = "; ".join(problems)
        await write_status(namespace, name, _invalid_status(message, generation, "InvalidSpec"))
        kopf.warn(body, reason="InvalidSpec", message=f"{message} (RayService left unchanged)")
        # Permanent: retrying cannot help; the next edit of the spec runs this handler again.
        raise kopf.PermanentError(message)
    missing = await _missing_dependency(spec)
    if missing:
        await write_status(
            namespace, name, _invalid_status(missing, generation, "GatewayAPIMissing")
        )
        kopf.warn(
            body, reason="GatewayAPIMissing", message=f"{missing} (RayService left unchanged)"
        )
        # Installing the Gateway API fixes it without an edit of the spec: check again later.
        raise kopf.TemporaryError(missing, delay=options.dependency_retry_sec)

    action, _ = await apply_rayservice(body, spec, name, namespace, children=True, options=options)
    if action != "unchanged":
        kopf.event(
            body, type="Normal", reason=action.capitalize(), message=f"RayService {name} {action}"
        )

    def applied(current: Mapping[str, Any], rayservice: Any) -> dict[str, Any]:
        now = now_iso()
        conditions = current.get("conditions") or []
        conditions = set_condition(conditions, INVALID_SPEC, False, "Valid", "", now, generation)
        derived = derive_status(name, namespace, rayservice, conditions, now, generation)
        return {**derived, "observedGeneration": generation}

    if not await write_status(namespace, name, applied):
        raise kopf.TemporaryError(
            "the ChatStream's status kept changing; writing it again", delay=1
        )
    return {"rayService": name, "action": action}


def _invalid_status(
    message: str, generation: int | None, reason: str
) -> Callable[[Mapping[str, Any], Any], dict[str, Any]]:
    """write_status's computation for a spec the operator refuses: InvalidSpec True."""

    def compute(current: Mapping[str, Any], _rayservice: Any) -> dict[str, Any]:
        conditions = current.get("conditions") or []
        return {
            "conditions": set_condition(
                conditions, INVALID_SPEC, True, reason, message, now_iso(), generation
            ),
            "observedGeneration": generation,
        }

    return compute


async def _missing_dependency(spec: Mapping[str, Any]) -> str | None:
    """What the cluster lacks for the spec (the Gateway API for incremental upgrades)."""
    if not needs_gateway_api(spec):
        return None
    with _api_errors():
        served = await kube.served_resources(GATEWAY_API_GROUP, GATEWAY_API_VERSION)
    return gateway_api_problem(spec, served)


async def repair_drift(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str,
    patch: kopf.Patch,
    memo: kopf.Memo | None = None,
    **_: Any,
) -> None:
    options = options_of(memo)
    if not _repairable(body, options):
        return
    action, _ = await apply_rayservice(body, spec, name, namespace, options=options)
    if action != "unchanged":
        kopf.warn(body, reason="DriftRepaired", message=f"RayService {name} {action}")
    await write_status(
        namespace, name, lambda current, rs: status_from(name, namespace, rs, current)
    )


def status_from(
    name: str, namespace: str, rayservice: dict[str, Any] | None, status: dict[str, Any]
) -> dict[str, Any]:
    """The ChatStream's status derived now from its RayService, after `status` (its current
    one: conditions keep their transition times)."""
    return derive_status(
        name,
        namespace,
        rayservice,
        status.get("conditions") or [],
        now_iso(),
        status.get("observedGeneration"),
    )


def register_drift_timer(interval_sec: float) -> None:
    """Opt-in (--drift-interval): kopf keeps a finalizer on every ChatStream that has a timer.
    Called by `chatstream-operator` before the operator starts, as kopf fixes a timer's
    interval when it is registered."""
    if interval_sec > 0:
        kopf.timer(GROUP, VERSION, PLURAL, interval=interval_sec, initial_delay=interval_sec)(
            repair_drift
        )


@kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL, labels={MANAGED_BY_LABEL: OPERATOR_NAME})
async def follow_rayservice(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    options = options_of(memo)
    owner = body.get("metadata", {}).get("labels", {}).get(NAME_LABEL)
    if not owner:
        return
    with _api_errors():
        chatstream = await kube.get_chatstream(namespace, owner)
    if chatstream is None or _deleting(chatstream):
        return  # the ChatStream is going; garbage collection removes the RayService
    if not _controlled_by(body, chatstream):
        return  # a deleted predecessor's RayService awaiting collection, or a stranger's
    if event["type"] != "DELETED" and _repairable(chatstream, options):
        spec = chatstream.get("spec") or {}
        action, _ = await apply_rayservice(chatstream, spec, owner, namespace, options=options)
        if action != "unchanged":
            kopf.warn(chatstream, reason="DriftRepaired", message=f"RayService {owner} {action}")

    def mirrored(current: Mapping[str, Any], rayservice: Any) -> dict[str, Any]:
        return status_from(owner, namespace, rayservice, current)

    if not await write_status(namespace, owner, mirrored):
        logger.info(f"ChatStream {owner} kept changing; its status follows at the next event")


# How often a status write is computed again when the ChatStream changed under it.
STATUS_WRITE_ATTEMPTS = 5


async def write_status(
    namespace: str,
    name: str,
    compute: Callable[[Mapping[str, Any], dict[str, Any] | None], dict[str, Any]],
) -> bool:
    """Write the ChatStream's status: the one way the operator writes conditions (reconcile,
    the RayService follower, the drift timer). `compute(current_status, rayservice)` gives the
    status fields from fresh reads: the ChatStream first, then its RayService (None when absent
    or not its own). The write applies only onto the ChatStream version read (resourceVersion
    precondition); on a conflict, everything is read and computed again. So a status computed
    from an older RayService never lands after one computed from a newer: a RayService change
    after the RayService read also comes after the ChatStream read, and its follower's write
    either lands first (this one then conflicts) or reads it. False if every attempt conflicted.
    """
    for _attempt in range(STATUS_WRITE_ATTEMPTS):
        with _api_errors():
            chatstream = await kube.get_chatstream(namespace, name)
            if chatstream is None or _deleting(chatstream):
                return True  # nothing to report on
            rayservice = await kube.get_rayservice(namespace, name)
        if rayservice is not None and not _controlled_by(rayservice, chatstream):
            rayservice = None  # a predecessor's or a stranger's: not this ChatStream's state
        current = chatstream.get("status") or {}
        changes = status_changes(current, compute(current, rayservice))
        if not changes:
            return True
        version = chatstream.get("metadata", {}).get("resourceVersion")
        try:
            with _api_errors():
                await kube.patch_chatstream_status(namespace, name, changes, version)
            return True
        except kube.Conflict:
            continue  # changed since read: read again
    return False
