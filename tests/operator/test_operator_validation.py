"""Defence in depth: the operator checks each spec against the CRD's own schema (read from the
CRD) and KubeRay's naming rules, whether or not the API server applied the schema."""

from __future__ import annotations

import pytest
from chatstream_operator import schema
from chatstream_operator.spec import validate
from chatstream_operator.status import derive_status

from tests.operator.crd_schema import chatstream_schema


def test_the_schema_is_the_crds_own():
    assert schema.spec_schema() == chatstream_schema()["properties"]["spec"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"replicas": -5}, "spec.replicas"),
        ({"replicas": "3"}, "spec.replicas"),
        ({"engine": "llamacpp"}, "spec.engine"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"resources": {"gpus": 1.5}}, "spec.resources.gpus"),
        ({"generation": {"topP": 7}}, "spec.generation.topP"),
        ({"maxQueuedRequests": -2}, "spec.maxQueuedRequests"),
        ({"head": {"cpus": 0}}, "spec.head.cpus"),
        ({"resources": {"tolerations": [{"operator": "Maybe"}]}}, "spec.resources.tolerations[0]"),
        ({"replica": 3}, "spec.replica"),  # a typo is not silently ignored
        ({"session": {"cookieSecure": "yes"}}, "spec.session.cookieSecure"),
    ],
)
def test_what_the_schema_refuses_the_operator_refuses(spec, field):
    problems = validate(spec)
    assert problems and all(p.startswith(field) for p in problems), problems


def test_a_schema_problem_does_not_crash_the_later_checks():
    # Today's cross-field checks compare numbers; a string there must not raise.
    assert validate({"autoscaling": {"minReplicas": "1", "maxReplicas": 2}})


@pytest.mark.parametrize(
    "name",
    ["a" * 48, "Chat", "1chat", "chat.v2", "chat-", "chat_v2"],
)
def test_names_kuberay_refuses_are_invalid(name):
    problems = validate({}, name=name)
    assert problems and all(p.startswith("metadata.name") for p in problems)


@pytest.mark.parametrize("name", ["a" * 47, "chat", "chat-v2", "c"])
def test_names_kuberay_accepts(name):
    assert validate({}, name=name) == []


def test_the_samples_and_defaults_are_valid():
    from tests.operator.crd_schema import SAMPLES, load_sample

    for sample in sorted(SAMPLES.glob("*.yaml")):
        obj = load_sample(sample.name)
        assert validate(obj["spec"], name=obj["metadata"]["name"]) == [], sample


def test_a_negative_count_never_shows_as_replicas():
    """A RayService with a negative num_replicas (written by an older operator) is no count."""
    from chatstream_operator.render import render_rayservice

    rs = render_rayservice("chat", {"replicas": 2})
    rs["spec"]["serveConfigV2"] = rs["spec"]["serveConfigV2"].replace(
        "num_replicas: 2", "num_replicas: -5"
    )
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = -5
    status = derive_status("chat", "ns", rs, [], "2026-01-01T00:00:00Z")
    assert (status["replicas"], status["readyReplicas"]) == (0, 0)


def test_the_upgrade_strategy_is_the_specs():
    from chatstream_operator.render import render_rayservice

    from tests.operator.crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for

    assert render_rayservice("chat", {})["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    options = {"gatewayClassName": "istio", "stepSizePercent": 25, "intervalSeconds": 30}
    spec = {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                                "clusterUpgradeOptions": options}}  # fmt: skip
    assert validate(spec) == []
    rs = render_rayservice("chat", spec)
    assert rs["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": options,
    }
    assert errors(validator_for(load_crd(KUBERAY_CRD_PATH), "v1"), rs) == []
    (problem,) = validate({"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}})
    assert problem.startswith("spec.upgradeStrategy.clusterUpgradeOptions is required")
    assert validate({"upgradeStrategy": {"type": "Rolling"}})


def test_an_exclusive_minimum_is_exclusive():
    (problem,) = validate({"autoscaling": {"maxReplicas": 2, "targetOngoingRequests": 0}})
    assert problem.startswith("spec.autoscaling.targetOngoingRequests (0) must be more than 0")


def test_autoscaling_delays_reach_serve_in_place():
    """Serve's upscale/downscale delays and look-back period: autoscaling_config options, which
    Serve applies without a rebuild (like the bounds)."""
    from chatstream_operator.render import model_deployment
    from ray.serve.config import AutoscalingConfig

    timing = {"upscaleDelaySec": 5, "downscaleDelaySec": 300, "lookBackPeriodSec": 20}
    spec = {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, **timing}}
    assert validate(spec) == []
    config = model_deployment(spec)["autoscaling_config"]
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (5, 300)
    assert config["look_back_period_s"] == 20
    AutoscalingConfig(**config)  # Serve accepts it
    plain = model_deployment({"autoscaling": {"maxReplicas": 4}})["autoscaling_config"]
    assert "upscale_delay_s" not in plain  # Serve's defaults
    assert validate({"autoscaling": {"maxReplicas": 4, "lookBackPeriodSec": 0}})
