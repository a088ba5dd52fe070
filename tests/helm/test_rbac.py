"""RBAC is exact. The real operator runs against kmock's emulated API server (the operator's
integration scenario, tests/operator/harness.py) cluster-wide and namespaced; every API call it
makes must be allowed by the rules the chart renders for that mode, and every rule must be
needed by at least one call: no wildcards, nothing unused.

Peering (peering.enabled) is not covered: the scenario runs the operator standalone.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from harness import NAMESPACE, ApiCall, run_operator_lifecycle  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SERVICE_ACCOUNT = {"kind": "ServiceAccount", "name": "chatstream", "namespace": "chatstream-system"}
CLUSTER = "*"  # the scope of a grant from a ClusterRole

MODES = {
    "cluster-wide": ({}, None),
    "namespaced": ({"clusterWide": False, "watchNamespaces": [NAMESPACE]}, [NAMESPACE]),
}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request):
    """(chart values, the API calls the operator made when run with the matching scope)."""
    values, namespaces = MODES[request.param]
    calls = asyncio.run(run_operator_lifecycle(namespaces=namespaces))
    assert calls, "the operator made no API call at all"
    return values, calls


def grants(manifests) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, scope) granted to the operator's ServiceAccount; scope is a
    namespace for a Role, CLUSTER for a ClusterRole."""
    roles = {
        (m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]): m["rules"]
        for m in manifests
        if m["kind"] in ("Role", "ClusterRole")
    }
    granted = set()
    for binding in manifests:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        assert binding["subjects"] == [SERVICE_ACCOUNT]
        namespace = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role_namespace = namespace if ref["kind"] == "Role" else None
        for rule in roles[(ref["kind"], role_namespace, ref["name"])]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((group, resource, verb, namespace or CLUSTER))
    return granted


def needs(call: ApiCall) -> tuple[str, str, str]:
    resource = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
    return call.group, resource, call.verb


def grants_for(call: ApiCall, granted) -> set[tuple[str, str, str, str]]:
    """The grants that allow `call` (a namespaced call happens in the scenario's namespace)."""
    scopes = {CLUSTER, NAMESPACE} if call.namespaced else {CLUSTER}
    return {(*needs(call), scope) for scope in scopes} & granted


def test_no_wildcards(render):
    for values, _ in MODES.values():
        for manifest in render(values):
            for rule in manifest.get("rules", []):
                assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]


def test_every_call_the_operator_makes_is_allowed(render, mode):
    values, calls = mode
    granted = grants(render(values))

    refused = sorted({needs(call) for call in calls if not grants_for(call, granted)})
    assert refused == []


def test_every_rule_is_needed_by_a_call(render, mode):
    values, calls = mode
    granted = grants(render(values))

    used = set()
    for call in calls:
        allowing = grants_for(call, granted)
        # A namespaced call is credited to the Role when one allows it, else to the ClusterRole.
        in_namespace = {g for g in allowing if g[3] != CLUSTER}
        used |= in_namespace or allowing
    assert sorted(granted - used) == []


def test_namespaced_mode_grants_nothing_namespaced_cluster_wide(render):
    values, _ = MODES["namespaced"]
    cluster_resources = {
        resource for _, resource, _, scope in grants(render(values)) if scope == CLUSTER
    }
    assert cluster_resources == {"customresourcedefinitions"}


def test_a_missing_rule_would_be_caught(render, mode):
    """The check can fail: without the events rule, the operator's events are refused."""
    values, calls = mode
    granted = {g for g in grants(render(values)) if g[1] != "events"}

    refused = {needs(call) for call in calls if not grants_for(call, granted)}
    assert refused == {("", "events", "create")}
