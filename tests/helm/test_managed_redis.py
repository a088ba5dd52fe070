"""helm/chatstream/values-managed-redis.yaml: how the chart points ChatStreams at a managed
Redis Cluster or Sentinel. It lints clean, renders valid manifests, installs no Redis and holds
no password: the sample ChatStream names the user's Secret, whose URL reaches the Ray pods as
CHATSTREAM_REDIS_URL through a secretKeyRef. The URL forms it documents are the ones the store
parses (serve_app.stores.redis_url)."""

from __future__ import annotations

import re
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chatstream_operator.render import render_rayservice
from test_manifests import FOREIGN_KINDS, KUBERNETES_VERSION, strict_crd_schema

from serve_app.stores.redis_url import parse_redis_url

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "chatstream"
VALUES_FILE = CHART_DIR / "values-managed-redis.yaml"
WARNING = 2


@pytest.fixture(scope="module")
def chatstream_validator(crd):
    """As test_manifests': the CRD's schema, strict (unknown fields are errors)."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text())


def test_the_managed_redis_values_lint_clean():
    report = helm.lint(
        CHART_DIR, values(), strict=True, namespace="chatstream-system", kube_version="v1.33.0"
    )
    assert [m for m in report["messages"] if m["severity"] >= WARNING] == []
    assert report["errors"] == []


def test_the_managed_redis_values_render_valid_manifests_without_a_redis(
    render, chatstream_validator
):
    manifests = render(values())
    assert not [m for m in manifests if "redis" in m["metadata"]["name"]]
    assert not [m for m in manifests if m["kind"] == "Secret"]
    for manifest in manifests:
        if manifest["kind"] == "ChatStream":
            chatstream_validator.validate(manifest)
        elif manifest["kind"] not in FOREIGN_KINDS:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    (sample,) = [m for m in manifests if m["kind"] == "ChatStream"]
    ref = {"name": "chatstream-redis-url", "key": "url"}
    assert sample["spec"]["session"] == {"store": "redis", "redisUrlSecretRef": ref}
    rayservice = render_rayservice(sample["metadata"]["name"], sample["spec"])
    envs = [
        env
        for group in [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]]
        + rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
        for env in container.get("env", [])
        if env["name"] == "CHATSTREAM_REDIS_URL"
    ]
    assert envs and all(env["valueFrom"]["secretKeyRef"] == ref for env in envs)
    assert "password" not in yaml.safe_dump(rayservice["spec"]["serveConfigV2"]).lower()


def test_the_documented_urls_are_the_ones_the_store_parses():
    documented = re.findall(r"'(rediss?\+\w+://[^']+)'", VALUES_FILE.read_text())
    shapes = {parse_redis_url(url.replace("<", "").replace(">", "")).mode for url in documented}
    assert shapes == {"cluster", "sentinel"}
