"""NewClusterWithIncrementalUpgrade needs the Kubernetes Gateway API: the operator checks that
the cluster serves it (a discovery read) before it renders such a RayService, and says what to
install when it does not. Against kmock (harness.run_gateway_scenario)."""

from __future__ import annotations

import asyncio

import pytest
from chatstream_operator.spec import gateway_api_problem
from harness import INCREMENTAL, GatewayResult, run_gateway_scenario

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run() -> GatewayResult:
    return asyncio.run(run_gateway_scenario())


def _invalid_spec(chatstream: dict) -> dict:
    return next(c for c in chatstream["status"]["conditions"] if c["type"] == "InvalidSpec")


def test_without_the_gateway_api_the_spec_is_refused_naming_what_to_install(run):
    condition = _invalid_spec(run.refused)
    assert condition["status"] == "True"
    assert condition["reason"] == "GatewayAPIMissing"
    for needed in ("gateway.networking.k8s.io/v1", "gateways", "httproutes", "Gateway API CRDs",
                   "RayServiceIncrementalUpgrade", "NewCluster"):  # fmt: skip
        assert needed in condition["message"]
    assert run.refused_rayservice is None
    warnings = [e for e in run.events if e.get("reason") == "GatewayAPIMissing"]
    assert warnings and warnings[0]["type"] == "Warning"
    assert "Gateway API CRDs" in warnings[0]["message"]


def test_once_the_gateway_api_is_installed_the_rayservice_follows_without_an_edit(run):
    assert run.rayservice["spec"]["upgradeStrategy"] == INCREMENTAL
    assert _invalid_spec(run.accepted)["status"] == "False"
    assert run.accepted["metadata"]["generation"] == run.refused["metadata"]["generation"]


def test_the_rule_is_pure_and_asks_for_both_resources():
    spec = {"upgradeStrategy": INCREMENTAL}
    assert gateway_api_problem(spec, set()) is not None
    assert "httproutes" in gateway_api_problem(spec, {"gateways"})
    assert gateway_api_problem(spec, {"gateways", "httproutes"}) is None
    assert gateway_api_problem({}, set()) is None  # NewCluster needs none
