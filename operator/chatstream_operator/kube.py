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

    try:
        return await asyncio.to_thread(run)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            raise NotFound(f"{method}: {e.reason}") from e
        raise


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
    namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    return await _call(
        "patch_namespaced_custom_object_status",
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"status": dict(status)},
    )
