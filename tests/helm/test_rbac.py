"""RBAC is exact. The real operator runs against kmock's emulated API server, cluster-wide and
namespaced: the operator's integration scenario (tests/operator/harness.py), and a short run
with peering (the scenario runs standalone). Every API call it makes must be allowed by the rules
the chart renders for that mode, and every rule must be needed by a call: no wildcards, nothing
unused. The runs happen in subprocesses (see operator_calls.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from harness import NAMESPACE, ApiCall  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RUNNER = Path(__file__).with_name("operator_calls.py")
PEERING = "chatstream-peering"


def operator_calls(
    scenario: str, tmp: Path, namespaces: list[str] | None = None, operator_args=()
) -> list[ApiCall]:
    """The API calls the operator made in `scenario`, run in a fresh interpreter."""
    out = tmp / f"{scenario}.json"
    command = [sys.executable, str(RUNNER), scenario, str(out)]
    command += [f"--namespace={ns}" for ns in namespaces or []]
    if operator_args:
        command += ["--", *operator_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [ApiCall(**call) for call in json.loads(out.read_text())]
    assert calls, "the operator made no API call at all"
    return calls


SERVICE_ACCOUNT = {"kind": "ServiceAccount", "name": "chatstream", "namespace": "chatstream-system"}
CLUSTER = "*"  # the scope of a grant from a ClusterRole

MODES = {
    "cluster-wide": ({}, None),
    "namespaced": ({"clusterWide": False, "watchNamespaces": [NAMESPACE]}, [NAMESPACE]),
}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request, tmp_path_factory):
    """(chart values, the API calls the operator made in the scenario with the matching scope)."""
    values, namespaces = MODES[request.param]
    return values, operator_calls("lifecycle", tmp_path_factory.mktemp("calls"), namespaces)


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


def test_namespaced_mode_grants_nothing_cluster_wide(render):
    values, _ = MODES["namespaced"]
    assert {scope for *_, scope in grants(render(values))} == {NAMESPACE}


def test_a_missing_rule_would_be_caught(render, mode):
    """The check can fail: without the events rule, the operator's events are refused."""
    values, calls = mode
    granted = {g for g in grants(render(values)) if g[1] != "events"}

    refused = {needs(call) for call in calls if not grants_for(call, granted)}
    assert refused == {("", "events", "create")}


PEERING_MODES = {
    "cluster-wide": {"replicas": 2, "peering": {"enabled": True, "name": PEERING}},
    "namespaced": {
        "replicas": 2,
        "peering": {"enabled": True, "name": PEERING},
        "clusterWide": False,
        "watchNamespaces": [NAMESPACE],
    },
}


@pytest.mark.parametrize("mode_name", list(PEERING_MODES))
def test_peering_rules_are_exactly_what_a_peered_operator_uses(render, mode_name, tmp_path):
    values = PEERING_MODES[mode_name]
    manifests = render(values)
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    # The operator as the chart runs it, less the liveness endpoint (no port to bind here).
    args = [a for a in args if not a.startswith("--liveness")] + ["--liveness="]
    calls = operator_calls("peering", tmp_path, operator_args=args)
    granted = grants(manifests)
    standalone = grants(render({**values, "replicas": 1, "peering": {"enabled": False}}))

    refused = sorted({needs(call) for call in calls if not grants_for(call, granted)})
    assert refused == []
    peering_rules = granted - standalone
    assert {resource for _, resource, _, _ in peering_rules} in (
        {"clusterkopfpeerings"},
        {"kopfpeerings"},
    )
    used = {g for call in calls for g in grants_for(call, granted)}
    assert sorted(peering_rules - used) == []
