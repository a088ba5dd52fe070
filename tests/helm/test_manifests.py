"""Every manifest the chart renders is one a Kubernetes API server would accept: built-in kinds
are validated with kubernetes-validate (strict: unknown fields are errors) against a pinned
Kubernetes version, the sample ChatStream against the CRD's own schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

KUBERNETES_VERSION = "1.33.0"
CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "chatstream"

# Kinds from other projects' CRDs; neither kubernetes-validate nor this repository has their
# schemas. test_render.py checks the fields of these that matter.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering"}


def strict_crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's openAPIV3Schema as a JSON schema that also refuses unknown fields, which the
    API server would silently prune (a misspelt field would just vanish)."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    for child in schema.get("properties", {}).values():
        child.update(strict_crd_schema(child))
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict_crd_schema(schema["items"])
    return schema


@pytest.fixture(scope="session")
def chatstream_validator(crd):
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
    # metadata is the API server's to check; OpenAPI 3.0's boolean exclusiveMinimum is draft 4.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def test_every_rendered_manifest_is_valid_kubernetes(render, value_set, chatstream_validator):
    _, values = value_set
    for manifest in render(values):
        kind = manifest["kind"]
        if kind == "ChatStream":
            chatstream_validator.validate(manifest)
        elif kind not in FOREIGN_KINDS:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_crd_the_chart_installs_is_valid_kubernetes(chart):
    (crd_file,) = chart.crds
    kubernetes_validate.validate(yaml.safe_load(crd_file["data"]), KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_broken_manifest(render):
    """The check above can fail: a misspelt field in the Deployment is refused."""
    (deployment,) = [m for m in render() if m["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_sample_with_a_misspelt_field_is_refused(render, chatstream_validator):
    (sample,) = [m for m in render({"sample": {"enabled": True}}) if m["kind"] == "ChatStream"]
    sample["spec"]["replica"] = 2

    with pytest.raises(jsonschema.ValidationError, match="replica"):
        chatstream_validator.validate(sample)


def test_sample_with_an_unknown_engine_is_refused(render, chatstream_validator):
    values = {"sample": {"enabled": True, "spec": {"engine": "llamacpp"}}}
    (sample,) = [m for m in render(values) if m["kind"] == "ChatStream"]

    with pytest.raises(jsonschema.ValidationError, match="llamacpp"):
        chatstream_validator.validate(sample)


def test_peering_crds_define_what_the_chart_creates(render):
    """kopf looks for its peering objects as kopf.dev/v1 clusterkopfpeerings and kopfpeerings
    (test_rbac.py runs a peered operator against them)."""
    crds = list(yaml.safe_load_all((CHART_DIR / "peering" / "kopf-peering-crds.yaml").read_text()))
    for crd in crds:
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    served = {
        c["spec"]["names"]["kind"]: (
            c["spec"]["group"],
            c["spec"]["names"]["plural"],
            c["spec"]["scope"],
        )
        for c in crds
    }
    assert served == {
        "ClusterKopfPeering": ("kopf.dev", "clusterkopfpeerings", "Cluster"),
        "KopfPeering": ("kopf.dev", "kopfpeerings", "Namespaced"),
    }

    cluster_wide = render({"peering": {"enabled": True}})
    namespaced = render({"peering": {"enabled": True}, "clusterWide": False})
    peerings = [m for m in cluster_wide + namespaced if "Peering" in m["kind"]]
    assert sorted(m["kind"] for m in peerings) == ["ClusterKopfPeering", "KopfPeering"]
    for manifest in peerings:
        assert manifest["apiVersion"] == "kopf.dev/v1"
        assert ("namespace" in manifest["metadata"]) == (manifest["kind"] == "KopfPeering")
