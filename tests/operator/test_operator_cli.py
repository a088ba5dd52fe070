"""The `chatstream-operator` command line: scope, liveness, peering -> kopf.operator kwargs."""

from __future__ import annotations

import pytest
from chatstream_operator.__main__ import DEFAULT_LIVENESS, operator_kwargs, parse_args


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("CHATSTREAM_NAMESPACES", "CHATSTREAM_LIVENESS", "CHATSTREAM_PEERING"):
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
