"""The `chatstream-operator` command line: scope, liveness, peering -> kopf.operator kwargs."""

from __future__ import annotations

import json
import os

import pytest
from chatstream_operator.__main__ import DEFAULT_LIVENESS, operator_kwargs, parse_args
from chatstream_operator.network import DEFAULT_CONTROL_PLANE_PEERS
from chatstream_operator.options import OperatorOptions, options_of


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (
        "CHATSTREAM_NAMESPACES",
        "CHATSTREAM_LIVENESS",
        "CHATSTREAM_PEERING",
        "CHATSTREAM_DRIFT_INTERVAL_SEC",
        "CHATSTREAM_ALLOWED_IMAGE_REPOSITORIES",
        "CHATSTREAM_NETWORK_POLICY",
        "CHATSTREAM_CONTROL_PLANE_PEERS",
        "CHATSTREAM_METRICS_PEERS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CHATSTREAM_STANDALONE", raising=False)


def test_default_is_all_namespaces_with_liveness_and_automatic_peering():
    kwargs = operator_kwargs(parse_args([]))
    assert kwargs["clusterwide"] is True and "namespaces" not in kwargs
    assert kwargs["liveness_endpoint"] == DEFAULT_LIVENESS == "http://0.0.0.0:8080/healthz"
    assert kwargs["standalone"] is False and kwargs["peering_name"] is None
    assert kwargs["settings"].scanning.disabled is False  # CRDs installed later are noticed


def test_several_namespaces_need_no_cluster_wide_scanning():
    kwargs = operator_kwargs(parse_args(["-n", "team-a", "--namespace=team-b"]))
    assert kwargs["namespaces"] == ["team-a", "team-b"] and "clusterwide" not in kwargs
    assert kwargs["settings"].scanning.disabled is True


def test_namespace_globs_keep_scanning():
    kwargs = operator_kwargs(parse_args(["-n", "team-*"]))
    assert kwargs["namespaces"] == ["team-*"]
    assert kwargs["settings"].scanning.disabled is False


def test_namespaces_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHATSTREAM_NAMESPACES", "a, b,")
    assert operator_kwargs(parse_args([]))["namespaces"] == ["a", "b"]
    assert operator_kwargs(parse_args(["-A"]))["clusterwide"] is True


def test_namespace_and_all_namespaces_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "x"])
    assert "not allowed with" in capsys.readouterr().err


def test_peering_and_standalone():
    kwargs = operator_kwargs(parse_args(["--peering=chatstream", "--priority=10"]))
    assert (kwargs["peering_name"], kwargs["priority"], kwargs["standalone"]) == (
        "chatstream",
        10,
        False,
    )
    kwargs = operator_kwargs(parse_args(["--standalone"]))
    assert kwargs["standalone"] is True and kwargs["peering_name"] is None
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering=x"])


def test_liveness_can_be_moved_or_disabled():
    url = "http://0.0.0.0:9090/live"
    assert operator_kwargs(parse_args([f"--liveness={url}"]))["liveness_endpoint"] == url
    assert operator_kwargs(parse_args(["--liveness="]))["liveness_endpoint"] is None


def test_no_drift_timer_by_default():
    """A timer makes kopf keep a finalizer on every ChatStream; none unless asked for."""
    assert parse_args([]).drift_interval == 0
    assert parse_args(["--drift-interval=60"]).drift_interval == 60


def test_allow_list_and_network_policy_reach_the_handlers_as_memo():
    """The flags travel to the handlers as kopf's memo, not through the environment."""
    prometheus = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    before = dict(os.environ)
    args = parse_args(
        [
            "--allowed-image-repository=registry.example.com/ml",
            "--allowed-image-repository=ghcr.io/acme",
            f"--metrics-peers={json.dumps(prometheus)}",
            "--drift-interval=30",
        ]
    )
    options = options_of(operator_kwargs(args)["memo"])
    assert options.allowed_image_repositories == ("registry.example.com/ml", "ghcr.io/acme")
    assert options.network_policy is True
    assert list(options.control_plane_peers) == DEFAULT_CONTROL_PLANE_PEERS
    assert list(options.metrics_peers) == prometheus
    assert options.drift_interval_sec == 30
    assert dict(os.environ) == before
    off = options_of(operator_kwargs(parse_args(["--no-network-policy"]))["memo"])
    assert off.network_policy is False and off.allowed_image_repositories == ()


def test_handlers_without_a_memo_use_the_defaults():
    """`kopf run -m chatstream_operator.handlers` passes an empty memo."""
    import kopf

    assert options_of(kopf.Memo()) == options_of(None) == OperatorOptions()


def test_allow_list_and_peers_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("CHATSTREAM_ALLOWED_IMAGE_REPOSITORIES", "a.example/x, b.example/y")
    assert parse_args([]).allowed_image_repositories == ["a.example/x", "b.example/y"]
    with pytest.raises(SystemExit):
        parse_args(["--control-plane-peers", '{"podSelector": {}}'])  # a list is expected
    assert "NetworkPolicyPeer" in capsys.readouterr().err
