"""The load test's `scale` profile end to end: ChatStream with three model replicas, scaled
3 -> 1 -> 3 mid-run through the Serve config's ChatModel override (what KubeRay applies after
`kubectl scale`). The removed replicas drain their streams: no stream is cut, no error is
seen, the ingress replica is the same one throughout, and the accounting is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.fault_scale import with_replicas
from tests.support import run_load_profiles

ROOT = Path(__file__).resolve().parents[2]


def serve_details(overrides: list[dict]) -> dict:
    """GET /api/serve/applications/ as the scale injector reads it (the parts it uses)."""
    config = {
        "name": "chatstream",
        "route_prefix": "/",
        "import_path": "serve_app:app",
        "args": {"engine": "mock", "num_replicas": 3},
        "deployments": overrides,
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "applications": {"chatstream": {"status": "RUNNING", "deployed_app_config": config}},
    }


def test_a_scale_changes_only_the_model_replica_count() -> None:
    ingress = {"name": "ChatStreamIngress", "graceful_shutdown_timeout_s": 40.0}
    details = serve_details([ingress])
    config = with_replicas(details, "chatstream", "ChatModel", 1)
    (app,) = config["applications"]
    assert app["args"] == {"engine": "mock", "num_replicas": 3}  # no rebuild
    assert app["deployments"] == [ingress, {"name": "ChatModel", "num_replicas": 1}]
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    untouched = details["applications"]["chatstream"]["deployed_app_config"]
    assert untouched["deployments"] == [ingress]  # the running config is left as it was
    # Back up: the existing override is changed, not added again.
    details["applications"]["chatstream"]["deployed_app_config"] = app
    (app,) = with_replicas(details, "chatstream", "ChatModel", 3)["applications"]
    assert app["deployments"] == [ingress, {"name": "ChatModel", "num_replicas": 3}]


def test_an_autoscaling_deployment_is_not_scaled_by_count() -> None:
    details = serve_details([{"name": "ChatModel", "autoscaling_config": {"max_replicas": 3}}])
    with pytest.raises(ValueError, match="autoscales"):
        with_replicas(details, "chatstream", "ChatModel", 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_profile_keeps_every_stream_and_the_accounting_exact(tmp_path: Path) -> None:
    run_load_profiles(["scale"], tmp_path, "serve-scale.log", timeout_s=280)

    report = json.loads((tmp_path / "scale-accounting.json").read_text())
    assert report["ok"] and not report["differences"] and not report["extra_failures"]
    fault = report["run"]["fault"]
    assert fault["kind"] == "scale" and fault["killed"].endswith("replicas 3 -> 1 -> 3"), fault
    assert fault["recovered"], fault  # every count settled, the ingress replica kept
    seen = {row["key"]: row["client"] for row in report["rows"]}
    assert seen["success"] > 0 and seen["unknown_error_occurred"] == 0, seen
