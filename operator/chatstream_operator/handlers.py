"""kopf handlers: a thin layer over the pure `render`, `patching` and `status` modules.

- reconcile (create/resume/update): validate, render, adopt, create or minimally patch the
  RayService, write the ChatStream's status; an invalid spec only sets InvalidSpec.
- follow_rayservice (RayService events): undo edits made to the RayService behind our back
  (drift) and copy its state into the ChatStream's status.
- repair_drift (timer): the same apply now and then, in case a watch event was missed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
import kubernetes

from . import (
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
)
from .patching import merge_patch
from .render import render_rayservice
from .spec import validate
from .status import INVALID_SPEC, derive_status, now_iso, set_condition, status_changes

# Read at import: kopf fixes a timer's interval when the handler is registered.
DRIFT_INTERVAL_SEC = float(os.environ.get("CHATSTREAM_DRIFT_INTERVAL_SEC", "60"))


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
    body: Mapping[str, Any], spec: Mapping[str, Any], name: str, namespace: str
) -> tuple[str, dict[str, Any]]:
    """Create or minimally patch the RayService. Returns (created|updated|unchanged, object)."""
    desired = render_rayservice(name, spec)
    kopf.adopt(desired, owner=body)  # type: ignore[arg-type]  # a plain dict owner works too
    with _api_errors():
        # Always the fresh object: a patch computed from a stale event would undo newer changes.
        current = await kube.get_rayservice(namespace, name)
        if current is None:
            return "created", await kube.create_rayservice(namespace, desired)
        if not _controlled_by(current, body):
            raise kopf.PermanentError(
                f"RayService {name} exists but is not controlled by this ChatStream; "
                "delete or rename it"
            )
        changes = merge_patch(current, desired)
        if not changes:
            return "unchanged", current
        return "updated", await kube.patch_rayservice(namespace, name, changes)


def _deleting(body: Mapping[str, Any]) -> bool:
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


def _repairable(body: Mapping[str, Any]) -> bool:
    """Whether a difference to the rendered RayService is drift: the spec was reconciled
    (its generation observed), is valid, and the ChatStream is not being deleted. A spec change
    that reconcile has not handled yet is reconcile's job, not a repair."""
    meta, status = body.get("metadata", {}), body.get("status") or {}
    return (
        status.get("observedGeneration") == meta.get("generation")
        and not validate(body.get("spec") or {})
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
    **_: Any,
) -> dict[str, str]:
    now, generation = now_iso(), meta.get("generation")
    conditions = status.get("conditions") or []
    problems = validate(spec)
    if problems:
        message = "; ".join(problems)
        patch.status["conditions"] = set_condition(
            conditions, INVALID_SPEC, True, "InvalidSpec", message, now, generation
        )
        patch.status["observedGeneration"] = generation
        kopf.warn(body, reason="InvalidSpec", message=f"{message} (RayService left unchanged)")
        # Permanent: retrying cannot help; the next edit of the spec runs this handler again.
        raise kopf.PermanentError(message)

    action, rayservice = await apply_rayservice(body, spec, name, namespace)
    if action != "unchanged":
        kopf.event(
            body, type="Normal", reason=action.capitalize(), message=f"RayService {name} {action}"
        )
    conditions = set_condition(conditions, INVALID_SPEC, False, "Valid", "", now, generation)
    patch.status.update(derive_status(name, namespace, rayservice, conditions, now))
    patch.status["observedGeneration"] = generation
    return {"rayService": name, "action": action}


@kopf.timer(GROUP, VERSION, PLURAL, interval=DRIFT_INTERVAL_SEC, initial_delay=DRIFT_INTERVAL_SEC)
async def repair_drift(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    if not _repairable(body):
        return
    action, rayservice = await apply_rayservice(body, spec, name, namespace)
    if action != "unchanged":
        kopf.warn(body, reason="DriftRepaired", message=f"RayService {name} {action}")
    derived = derive_status(name, namespace, rayservice, status.get("conditions") or [], now_iso())
    patch.status.update(status_changes(status, derived))


@kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL, labels={MANAGED_BY_LABEL: OPERATOR_NAME})
async def follow_rayservice(
    event: kopf.RawEvent, body: kopf.Body, namespace: str, logger: kopf.Logger, **_: Any
) -> None:
    owner = body.get("metadata", {}).get("labels", {}).get(NAME_LABEL)
    if not owner:
        return
    with _api_errors():
        chatstream = await kube.get_chatstream(namespace, owner)
    if chatstream is None or _deleting(chatstream):
        return  # the ChatStream is going; garbage collection removes the RayService
    rayservice = None if event["type"] == "DELETED" else dict(body)
    if _repairable(chatstream):
        spec = chatstream.get("spec") or {}
        action, rayservice = await apply_rayservice(chatstream, spec, owner, namespace)
        if action != "unchanged":
            kopf.warn(chatstream, reason="DriftRepaired", message=f"RayService {owner} {action}")
    current = chatstream.get("status") or {}
    derived = derive_status(
        owner, namespace, rayservice, current.get("conditions") or [], now_iso()
    )
    changes = status_changes(current, derived)
    if changes:
        logger.debug(f"Mirroring RayService status into ChatStream {owner}: {changes}")
        with _api_errors():
            await kube.patch_chatstream_status(namespace, owner, changes)
