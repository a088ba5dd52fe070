"""helm/chatstream/values-gpu.yaml: the chart's GPU install. Its sample ChatStream runs
`engine: vllm` on the vLLM serve image (`vllmImage`, built from Dockerfile.vllm), lints clean,
passes the CRD and the operator's own checks, and renders a RayService that KubeRay accepts,
with one GPU per model pod."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import yaml
from chatstream_operator.render import render_rayservice
from chatstream_operator.schema import spec_problems
from chatstream_operator.spec import validate

import chatstream_defaults as shared

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "chatstream"
VALUES_FILE = CHART_DIR / "values-gpu.yaml"
WARNING = 2


def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text())


def test_the_gpu_values_lint_clean():
    report = helm.lint(
        CHART_DIR, values(), strict=True, namespace="chatstream-system", kube_version="v1.33.0"
    )
    assert [m for m in report["messages"] if m["severity"] >= WARNING] == []
    assert report["errors"] == []


def test_the_gpu_sample_runs_vllm_on_the_vllm_image(render):
    (sample,) = [m for m in render(values()) if m["kind"] == "ChatStream"]
    spec = sample["spec"]
    assert spec["engine"] == "vllm"
    assert spec["image"] == f"{shared.VLLM_IMAGE_REPOSITORY}:{shared.IMAGE_TAG}"
    assert spec_problems(spec) == [] and validate(spec, (), sample["metadata"]["name"]) == []
    rayservice = render_rayservice(sample["metadata"]["name"], spec)
    (workers,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["image"] == spec["image"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_pinned_vllm_image_reaches_the_gpu_sample(render):
    digest = "sha256:" + "0" * 64
    pinned = {**values(), "vllmImage": {"digest": digest}}
    (sample,) = [m for m in render(pinned) if m["kind"] == "ChatStream"]
    assert sample["spec"]["image"].endswith(f":{shared.IMAGE_TAG}@{digest}")
    assert spec_problems(sample["spec"]) == []
