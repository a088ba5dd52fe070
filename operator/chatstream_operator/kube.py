"""The operator's own API calls (kopf makes the rest: watches, its status patches, events).

The `kubernetes` client is synchronous, so each call runs in a worker thread. Its configuration
is the one kopf's login loaded (see handlers.login): in-cluster service account or kubeconfig.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kubernetes

from . import GROUP, PLURAL, RAY_GROUP, RAY_PLURAL, RAY_VERSION, VERSION


class NotFound(Exception):
    """The object (or its resource type) does not exist."""


def _custom_objects() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient())


async def _call(method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        api = _custom_objects()
        try:
            return getattr(api, method)(*args, **kwargs)
        finally:
            api.api_client.close()

    return await _in_thread(method, run, Conflict)


class Conflict(Exception):
    """The object changed since it was read (a resourceVersion precondition failed)."""


async def get_rayservice(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await _call(
            "get_namespaced_custom_object", RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name
        )
    except NotFound:
        return None


async def create_rayservice(namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return await _call(
        "create_namespaced_custom_object", RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, body
    )


async def patch_rayservice(namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
    # The client sends a dict body to patch_* as application/merge-patch+json.
    return await _call(
        "patch_namespaced_custom_object",
        RAY_GROUP,
        RAY_VERSION,
        namespace,
        RAY_PLURAL,
        name,
        patch,
    )


async def get_chatstream(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await _call("get_namespaced_custom_object", GROUP, VERSION, namespace, PLURAL, name)
    except NotFound:
        return None


async def patch_chatstream_status(
    namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None = None
) -> dict[str, Any]:
    """Merge-patch the status; with `resource_version`, only if the object is still at it
    (else Conflict): a status computed from what was read never overwrites a newer one."""
    body: dict[str, Any] = {"status": dict(status)}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return await _call(
        "patch_namespaced_custom_object_status", GROUP, VERSION, namespace, PLURAL, name, body
    )


class AlreadyExists(Exception):
    """An object of that name exists already."""


async def _call_typed(api_class: str, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A call of a typed API (CoreV1Api, NetworkingV1Api, ...), its answer as a plain dict."""

    def run() -> dict[str, Any]:
        client = kubernetes.client.ApiClient()
        try:
            result = getattr(getattr(kubernetes.client, api_class)(client), method)(*args, **kwargs)
            return client.sanitize_for_serialization(result)
        finally:
            client.close()

    return await _in_thread(method, run, AlreadyExists)


async def create_secret(namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Create a Secret; AlreadyExists if there is one. The operator never reads Secrets (no
    `get` on them in its RBAC): an existing one is left as it is."""
    return await _call_typed("CoreV1Api", "create_namespaced_secret", namespace, body)


async def _read_or_none(api: str, method: str, namespace: str, name: str) -> dict | None:
    """A namespaced object of the typed client, or None when there is none."""
    try:
        return await _call_typed(api, method, name, namespace)
    except NotFound:
        return None


async def get_network_policy(namespace: str, name: str) -> dict[str, Any] | None:
    return await _read_or_none("NetworkingV1Api", "read_namespaced_network_policy", namespace, name)


async def create_network_policy(namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return await _call_typed("NetworkingV1Api", "create_namespaced_network_policy", namespace, body)


async def patch_network_policy(
    namespace: str, name: str, patch: Mapping[str, Any]
) -> dict[str, Any]:
    return await _call_typed(
        "NetworkingV1Api", "patch_namespaced_network_policy", name, namespace, patch
    )


async def get_disruption_budget(namespace: str, name: str) -> dict[str, Any] | None:
    return await _read_or_none(
        "PolicyV1Api", "read_namespaced_pod_disruption_budget", namespace, name
    )


async def create_disruption_budget(namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return await _call_typed(
        "PolicyV1Api", "create_namespaced_pod_disruption_budget", namespace, body
    )


async def patch_disruption_budget(
    namespace: str, name: str, patch: Mapping[str, Any]
) -> dict[str, Any]:
    return await _call_typed(
        "PolicyV1Api", "patch_namespaced_pod_disruption_budget", name, namespace, patch
    )


async def served_resources(group: str, version: str) -> set[str]:
    """The resources (plurals) the API server serves in `group/version`; empty when it serves
    none. A discovery read: every authenticated client may make it (system:discovery), so it
    needs no RBAC rule."""
    try:
        found = await _call_typed("CustomObjectsApi", "get_api_resources", group, version)
    except NotFound:
        return set()
    return {r["name"] for r in (found or {}).get("resources") or []}


async def _in_thread(method: str, run: Any, conflict: type[Exception]) -> Any:
    """`run()` on a worker thread (the kubernetes client blocks), its API errors as ours: 404
    NotFound, 409 `conflict`."""
    try:
        return await asyncio.to_thread(run)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            raise NotFound(f"{method}: {e.reason}") from e
        if e.status == 409:
            raise conflict(f"{method}: {e.reason}") from e
        raise
