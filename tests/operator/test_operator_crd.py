"""The ChatStream CRD: names, subresources, printer columns, schema, defaults."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from chatstream_operator import GROUP, KIND, PLURAL, VERSION
from chatstream_operator.render import render_rayservice
from chatstream_operator.spec import AUTOSCALING_DEFAULTS, DEFAULTS, desired_replicas
from chatstream_operator.status import derive_status
from crd_schema import (
    apply_defaults,
    chatstream_schema,
    errors,
    load_crd,
    load_sample,
    validator_for,
    version_of,
)

SAMPLES = [
    "chatstream-sample.yaml",
    "chatstream-mock.yaml",
    "chatstream-gpu.yaml",
    "chatstream-vllm.yaml",
]

# Names of built-in resources (kubectl api-resources) that a short name must not shadow.
BUILTIN_SHORT_NAMES = {
    "cm", "cs", "csr", "crd", "crds", "deploy", "ds", "ep", "ev", "hpa", "ing", "limits",
    "netpol", "no", "ns", "pc", "pdb", "po", "psp", "pv", "pvc", "quota", "rc", "rs", "sa", "sc",
    "sts", "svc",
}  # fmt: skip


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd()


@pytest.fixture(scope="module")
def validator(crd):
    return validator_for(crd, VERSION)


def test_names_and_scope(crd):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (KIND, PLURAL, "chatstream")
    assert names["shortNames"] and not set(names["shortNames"]) & BUILTIN_SHORT_NAMES
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == [VERSION]


def test_printer_columns(crd):
    columns = {
        c["name"]: c["jsonPath"] for c in version_of(crd, VERSION)["additionalPrinterColumns"]
    }
    assert columns["Replicas"] == ".status.replicas"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Endpoint"] == ".status.endpoint"
    assert columns["Age"] == ".metadata.creationTimestamp"


def _get(obj: dict, json_path: str) -> Any:
    for part in json_path.lstrip(".").split("."):
        obj = obj[part]
    return obj


def test_scale_paths_are_the_fields_the_operator_reads_and_writes(crd):
    """kmock has no /scale; check instead that the paths name exactly what the operator uses."""
    scale = version_of(crd, VERSION)["subresources"]["scale"]
    assert version_of(crd, VERSION)["subresources"]["status"] == {}
    # What `kubectl scale --replicas=3` writes is what the renderer reads ...
    cs = {"spec": {"engine": "mock"}}
    path = scale["specReplicasPath"].lstrip(".").split(".")
    cs[path[0]][path[1]] = 3
    assert desired_replicas(cs["spec"]) == 3
    rendered = render_rayservice("chat", cs["spec"])
    assert rendered["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
    # ... and what the operator writes is where the scale subresource reads it back.
    status = {"status": derive_status("chat", "ns", rendered, [], "2026-01-01T00:00:00Z")}
    assert _get(status, scale["statusReplicasPath"]) == 3
    assert _get(status, scale["labelSelectorPath"]) == (
        "chatstream.dev/name=chat,chatstream.dev/component=model"
    )
    # The schema declares those fields with the types the scale subresource expects.
    props = chatstream_schema()["properties"]
    assert props["spec"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["selector"]["type"] == "string"


def _schema_defaults(schema: dict) -> dict:
    """Defaults the API server would fill into an empty spec (nested objects included)."""
    return apply_defaults(schema, {})


def test_operator_defaults_equal_the_crd_defaults():
    spec_schema = chatstream_schema()["properties"]["spec"]
    assert _schema_defaults(spec_schema) == DEFAULTS
    autoscaling = spec_schema["properties"]["autoscaling"]
    assert _schema_defaults(autoscaling) == AUTOSCALING_DEFAULTS


@pytest.mark.parametrize("sample", SAMPLES)
def test_samples_are_accepted(validator, sample):
    obj = load_sample(sample)
    assert obj["apiVersion"] == f"{GROUP}/{VERSION}" and obj["kind"] == KIND
    assert errors(validator, obj) == []
    assert errors(validator, apply_defaults(chatstream_schema(), obj)) == []


def _set(obj: dict, path: str, value: Any) -> dict:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    target = obj
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return obj


MALFORMED = [
    ("spec.engine", "llamacpp"),
    ("spec.replicas", -1),
    ("spec.replicas", "3"),
    ("spec.maxOngoingRequests", 0),
    ("spec.maxQueuedRequests", -2),
    ("spec.generation.temperature", 2.5),
    ("spec.generation.topP", 0),
    ("spec.generation.maxNewTokens", 0),
    ("spec.model.dtype", "int4"),
    ("spec.model.device", "tpu"),
    ("spec.autoscaling", {"minReplicas": 1}),  # maxReplicas is required
    ("spec.autoscaling.maxReplicas", 0),
    ("spec.autoscaling.targetOngoingRequests", 0),
    ("spec.resources.gpus", 1.5),
    ("spec.resources.memory", "lots"),
    ("spec.session.store", "etcd"),
    ("spec.session.redisUrlSecretRef", {"name": "redis"}),  # key is required
    ("spec.session.signingKeySecretRef", {"name": "Bad_Name", "key": "k"}),
    ("spec.auth.adminTokenSecretRef", {"name": "s", "key": "a key"}),
    ("spec.auth.apiKeysSecretRef", "keys"),
    ("spec.gcsFaultTolerance", {"redisPasswordSecretRef": {"name": "r", "key": "p"}}),
    ("spec.session.ttlSec", 10),
    ("spec.session.cookieName", "a cookie"),
    ("spec.image", ""),
    ("spec.image", "registry.example.com/ml/serve@sha256:abc"),  # a digest is 64 hex digits
    ("spec.image", "registry.example.com/ml/serve@md5:" + "a" * 32),
    ("spec.image", "serve:1.0 --privileged"),
    ("spec.model.revision", "main; rm -rf /"),
    ("spec.imagePullPolicy", "Sometimes"),
    ("spec.replica", 3),  # a typo: unknown fields are refused (strict field validation)
    ("spec", "chat"),
]


@pytest.mark.parametrize(("path", "value"), MALFORMED, ids=[f"{p}={v!r}" for p, v in MALFORMED])
def test_malformed_resources_are_rejected(validator, path, value):
    obj = _set(load_sample("chatstream-sample.yaml"), path, value)
    found = errors(validator, obj)
    assert found, f"{path}={value!r} was accepted"


def test_status_keeps_unknown_fields_for_kopf(validator):
    obj = load_sample("chatstream-sample.yaml")
    obj["status"] = {"replicas": 1, "reconcile": {"action": "created"}, "kopf": {"x": 1}}
    assert errors(validator, obj) == []


def test_the_crd_the_operator_and_serve_app_share_one_set_of_defaults():
    """chatstream_defaults is the one definition: an empty ChatStream renders exactly the
    arguments `serve run serve_app:app` would default to (for every shared knob)."""
    from chatstream_operator.render import serve_args

    from serve_app.config import ChatStreamConfig

    app_defaults = ChatStreamConfig().model_dump()
    rendered = serve_args({})
    shared = {
        "mock_mode", "max_ongoing_requests", "max_queued_requests", "ingress_replicas",
        "retry_after_sec", "stream_interval_ms", "temperature", "top_k", "top_p",
        "max_new_tokens", "session_store", "session_cookie_name", "session_ttl_sec",
        "session_max_turns", "cookie_secure", "quantization", "gpu_memory_utilization",
        "tensor_parallel_size", "enforce_eager", "cpu_kv_cache_gib", "fair_share_weights",
    }  # fmt: skip
    assert {k: rendered[k] for k in shared} == {k: app_defaults[k] for k in shared}
    assert AUTOSCALING_DEFAULTS["targetOngoingRequests"] == app_defaults["target_ongoing_requests"]


def test_the_model_revision_is_checked_as_serve_app_checks_it():
    """spec.model.revision becomes the Serve argument `revision`; the CRD refuses what
    serve_app's config refuses (its field is the one definition of the rule)."""
    from chatstream_operator.render import serve_args

    from serve_app.config import ChatStreamConfig

    field = ChatStreamConfig.model_json_schema()["properties"]["revision"]
    crd = chatstream_schema()["properties"]["spec"]["properties"]["model"]["properties"]["revision"]
    assert (crd["pattern"], crd["maxLength"], crd["default"]) == (
        field["pattern"],
        field["maxLength"],
        field["default"],
    )
    assert serve_args({"model": {"revision": "abc123"}})["revision"] == "abc123"
    assert serve_args({})["revision"] == ""


PINNED = [
    "docker.io/chatstream/chatstream-serve:0.1.0",
    "registry.example.com:5000/ml/chatstream-serve@sha256:" + "0a" * 32,
    "registry.example.com/ml/chatstream-serve:0.1.0@sha256:" + "f" * 64,
    "chatstream-serve:0.1.0",
]


@pytest.mark.parametrize("image", PINNED)
def test_images_pinned_by_digest_are_accepted(validator, image):
    """The API server (the CRD's pattern) and the operator (the same schema) both accept a tag,
    a digest, or both."""
    from chatstream_operator.schema import spec_problems

    obj = _set(load_sample("chatstream-sample.yaml"), "spec.image", image)
    assert errors(validator, obj) == []
    assert spec_problems(obj["spec"]) == []
