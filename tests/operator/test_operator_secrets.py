"""Secrets, GCS fault tolerance, the NetworkPolicy and the image allow-list (pure parts).

Secrets reach the Ray pods only as `valueFrom.secretKeyRef` env entries; nothing secret is ever
rendered into the RayService (whose spec anyone with read access sees).
"""

from __future__ import annotations

import base64
import copy
import json

import kubernetes_validate
import pytest
import yaml
from chatstream_operator import credentials, network
from chatstream_operator.credentials import (
    generated_keys,
    generated_secret_name,
    render_generated_secret,
    secret_env,
)
from chatstream_operator.network import render_network_policy
from chatstream_operator.render import render_rayservice
from chatstream_operator.spec import image_allowed, image_repository, validate
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for

from serve_app import config as serve_config

KUBERNETES_VERSION = "1.33.0"

REDIS_SPEC = {
    "engine": "mock",
    "session": {
        "store": "redis",
        "redisUrlSecretRef": {"name": "chat-redis", "key": "url"},
        "signingKeySecretRef": {"name": "chat-keys", "key": "cookie"},
    },
    "auth": {
        "adminTokenSecretRef": {"name": "chat-keys", "key": "admin"},
        "apiKeysSecretRef": {"name": "chat-api-keys", "key": "keys"},
    },
    "gcsFaultTolerance": {
        "redisAddress": "chatstream-redis.chatstream-system.svc:6379",
        "redisPasswordSecretRef": {"name": "chat-redis", "key": "password"},
    },
}


@pytest.fixture(scope="module")
def kuberay():
    return validator_for(load_crd(KUBERAY_CRD_PATH), "v1")


def _containers(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_env_var_names_are_serve_apps():
    """The operator keeps copies (its image has no serve_app); they must not drift."""
    names = {
        "REDIS_URL_ENV": "CHATSTREAM_REDIS_URL",
        "SESSION_SECRET_ENV": "CHATSTREAM_SESSION_SECRET",
        "ADMIN_TOKEN_ENV": "CHATSTREAM_ADMIN_TOKEN",
        "API_KEYS_ENV": "CHATSTREAM_API_KEYS",
    }
    for constant, literal in names.items():
        assert getattr(credentials, constant) == literal
        assert getattr(serve_config, constant) == literal, constant


def test_referenced_secrets_reach_the_head_only_as_secret_key_refs(kuberay):
    """The ingress replicas, which alone read these, run on the head (pinned there); the GPU
    workers never see the signing key, admin token, API keys or Redis URL."""
    rs = render_rayservice("chat", REDIS_SPEC)
    assert errors(kuberay, rs) == []
    expected = [
        {"name": "CHATSTREAM_REDIS_URL",
         "valueFrom": {"secretKeyRef": {"name": "chat-redis", "key": "url"}}},
        {"name": "CHATSTREAM_SESSION_SECRET",
         "valueFrom": {"secretKeyRef": {"name": "chat-keys", "key": "cookie"}}},
        {"name": "CHATSTREAM_ADMIN_TOKEN",
         "valueFrom": {"secretKeyRef": {"name": "chat-keys", "key": "admin"}}},
        {"name": "CHATSTREAM_API_KEYS",
         "valueFrom": {"secretKeyRef": {"name": "chat-api-keys", "key": "keys"}}},
    ]  # fmt: skip
    containers = _containers(rs)
    head, worker = containers
    assert head["env"] == expected
    assert worker["env"] == []
    # Nothing is written as a literal anywhere: no env `value`, no URL in the Serve config.
    assert not any("value" in e for c in containers for e in c["env"])
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["session_store"] == "redis"
    assert "redis://" not in json.dumps(rs) and "session_secret" not in app["args"]


def test_without_references_the_generated_secret_is_used():
    rs = render_rayservice("chat", {"engine": "mock"})
    for container in _containers(rs)[:1]:  # the head
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert refs == {
            "CHATSTREAM_SESSION_SECRET": {"name": "chat-chatstream", "key": "session-secret"},
            "CHATSTREAM_ADMIN_TOKEN": {"name": "chat-chatstream", "key": "admin-token"},
        }


def test_the_generated_secret_holds_fresh_random_keys():
    first = render_generated_secret("chat", {})
    second = render_generated_secret("chat", {})
    kubernetes_validate.validate(first, KUBERNETES_VERSION, strict=True)
    assert first["metadata"]["name"] == generated_secret_name("chat") == "chat-chatstream"
    assert set(first["data"]) == {"session-secret", "admin-token"}
    values = [base64.b64decode(v) for v in [*first["data"].values(), *second["data"].values()]]
    assert len(set(values)) == 4 and all(len(v) >= 32 for v in values)


def test_no_generated_secret_when_everything_is_referenced():
    assert generated_keys("chat", REDIS_SPEC) == []
    assert render_generated_secret("chat", REDIS_SPEC) is None
    only_admin = {"auth": {"adminTokenSecretRef": {"name": "a", "key": "b"}}}
    assert generated_keys("chat", only_admin) == ["session-secret"]


def test_redis_url_only_with_the_redis_store():
    spec = {"session": {"store": "ray", "redisUrlSecretRef": {"name": "r", "key": "url"}}}
    assert "CHATSTREAM_REDIS_URL" not in {e["name"] for e in secret_env("chat", spec)}


def test_the_redis_store_needs_a_url_secret():
    (problem,) = validate({"session": {"store": "redis"}})
    assert problem.startswith("spec.session.store is redis but spec.session.redisUrlSecretRef")
    assert validate(REDIS_SPEC) == []


def test_gcs_fault_tolerance_is_rendered_for_kuberay(kuberay):
    shared = copy.deepcopy(REDIS_SPEC)
    shared["gcsFaultTolerance"]["externalStorageNamespace"] = "chat"
    rs = render_rayservice("chat", shared)
    assert rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "chatstream-redis.chatstream-system.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "chat-redis", "key": "password"}}},
        "externalStorageNamespace": "chat",
    }
    assert errors(kuberay, rs) == []
    minimal = render_rayservice("chat", {"gcsFaultTolerance": {"redisAddress": "redis:6379"}})
    assert minimal["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis:6379"
    }
    assert errors(kuberay, minimal) == []
    assert "gcsFaultToleranceOptions" not in render_rayservice("chat", {})["spec"][
        "rayClusterConfig"
    ]


def test_the_network_policy_is_valid_and_opens_only_serve_to_everyone():
    policy = render_network_policy("chat")
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    spec = policy["spec"]
    assert policy["metadata"]["name"] == "chat-ray"
    assert spec["podSelector"] == {"matchLabels": {"chatstream.dev/name": "chat"}}
    assert spec["policyTypes"] == ["Ingress"]
    from_anywhere = [rule for rule in spec["ingress"] if "from" not in rule]
    assert from_anywhere == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    # Every other rule names its peers: the Ray cluster's own pods, and KubeRay's operator.
    peers = [peer for rule in spec["ingress"] if "from" in rule for peer in rule["from"]]
    assert peers == [
        {"podSelector": {"matchLabels": {"chatstream.dev/name": "chat"}}},
        *network.DEFAULT_CONTROL_PLANE_PEERS,
    ]


def test_the_network_policy_selects_the_pods_the_rayservice_runs():
    rs = render_rayservice("chat", {})
    selector = render_network_policy("chat")["spec"]["podSelector"]["matchLabels"]
    cluster = rs["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()


def test_network_policy_peers_are_configurable():
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    policy = render_network_policy("chat", control_plane_peers=[], metrics_peers=[prometheus])
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    assert policy["spec"]["ingress"][2:] == [
        {"from": [prometheus], "ports": [{"protocol": "TCP", "port": 8080}]}
    ]


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("chatstream-serve:0.1.0", "chatstream-serve"),
        ("registry.example.com:5000/ml/serve:1.0", "registry.example.com:5000/ml/serve"),
        ("registry.example.com:5000/ml/serve", "registry.example.com:5000/ml/serve"),
        ("ghcr.io/a/b@sha256:0123", "ghcr.io/a/b"),
        ("ghcr.io/a/b:1@sha256:0123", "ghcr.io/a/b"),
    ],
)
def test_image_repository(image, repository):
    assert image_repository(image) == repository


def test_image_allow_list():
    allowed = ["registry.example.com/ml", "chatstream-serve"]
    assert image_allowed("registry.example.com/ml/chatstream-serve:1.0", allowed)
    assert image_allowed("chatstream-serve:0.1.0", allowed)
    assert not image_allowed("registry.example.com/ml-other/x:1", allowed)
    assert not image_allowed("evil.example.com/registry.example.com/ml/x:1", allowed)
    assert not image_allowed("docker.io/library/chatstream-serve:0.1.0", allowed)
    assert image_allowed("anything:1", [])
    (problem,) = validate({"image": "evil.example.com/x:1"}, allowed)
    assert problem.startswith("spec.image (evil.example.com/x:1) is not in an allowed repository")
    assert validate({"image": "registry.example.com/ml/serve:2"}, allowed) == []


def test_the_redis_example_is_valid_and_renders_for_kuberay(kuberay):
    from crd_schema import load_sample, validator_for

    from serve_app.config import ChatStreamConfig

    example = load_sample("chatstream-redis.yaml")
    assert errors(validator_for(load_crd(), "v1alpha1"), example) == []
    assert validate(example["spec"]) == []
    rs = render_rayservice(example["metadata"]["name"], example["spec"])
    assert errors(kuberay, rs) == []
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    assert ChatStreamConfig.model_validate(app["args"]).session_store == "redis"
    env = {e["name"] for c in _containers(rs) for e in c["env"]}
    assert "CHATSTREAM_REDIS_URL" in env


def test_a_shared_external_storage_namespace_is_refused():
    """With new-cluster upgrades, the old cluster's Redis cleanup Job deletes the namespace the
    new cluster uses (ray-project/ray#39525, kuberay#5052): refused, saying what to do."""
    spec = copy.deepcopy(REDIS_SPEC)
    spec["gcsFaultTolerance"]["externalStorageNamespace"] = "chat"
    (problem,) = validate(spec)
    assert problem.startswith("spec.gcsFaultTolerance.externalStorageNamespace")
    assert "remove it" in problem
