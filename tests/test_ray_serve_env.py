"""Ray Serve's throughput-optimized mode is the default a user gets (chatstream_defaults.
RAY_SERVE_ENV): `serve run serve_app:app` sets it for the Ray cluster it starts, LocalServe for
its `serve run`, and a variable the user set already wins. Without Ray: nothing starts here."""

from __future__ import annotations

import os

import pytest

from chatstream_defaults import RAY_SERVE_ENV, ray_serve_env
from serve_app.builder import app


@pytest.fixture
def clean_env(monkeypatch):
    for key in RAY_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)


def test_the_mode_keeps_serve_s_proxy_and_replica_logs_on_the_console():
    assert RAY_SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Without Serve's proxy a client leaving while it waits for a slot goes unnoticed.
    assert RAY_SERVE_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert RAY_SERVE_ENV["RAY_SERVE_LOG_TO_STDERR"] == "1"


def test_a_variable_already_set_wins():
    environ = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "PATH": "/bin"}
    missing = ray_serve_env(environ)
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in missing
    assert missing == {
        k: v for k, v in RAY_SERVE_ENV.items() if k != "RAY_SERVE_THROUGHPUT_OPTIMIZED"
    }


def test_serve_run_of_the_import_path_sets_the_mode_before_ray_starts(clean_env, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")  # the user's own choice
    app({"engine": "mock"})
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert os.environ["RAY_SERVE_LOG_TO_STDERR"] == "1"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"


def test_a_bad_argument_changes_nothing(clean_env):
    with pytest.raises(ValueError):
        app({"engine": "no-such-engine"})
    assert not any(key in os.environ for key in RAY_SERVE_ENV)
