"""The chart lints clean, and values a user could get wrong are refused with a message that says
what is wrong (values.schema.json, plus the template checks the schema cannot express)."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "chatstream"
VALUES_FILE = CHART_DIR / "values.yaml"
WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


def test_lint_is_clean_for_every_value_set(value_set):
    _, values = value_set
    report = helm.lint(
        CHART_DIR, values, strict=True, namespace="chatstream-system", kube_version="v1.33.0"
    )

    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert problems == [] and report["errors"] == []


def test_values_yaml_documents_every_knob():
    """Every leaf of values.yaml has a `# --` comment above it, or sits inside a map whose key
    has one (e.g. resources.requests.cpu under the documented `resources`)."""
    lines = VALUES_FILE.read_text().splitlines()
    undocumented = []
    sections: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        sections = [(i, d) for i, d in sections if i < indent]
        documented = _has_doc_comment(lines, number) or any(d for _, d in sections)
        if stripped.endswith(":"):
            sections.append((indent, documented))
        elif not documented:
            undocumented.append(stripped)
    assert undocumented == []


def _has_doc_comment(lines: list[str], number: int) -> bool:
    """Whether the block of comment lines right above line `number` holds a `# --` comment."""
    above = number - 1
    while above >= 0 and lines[above].strip().startswith("#"):
        if lines[above].strip().startswith("# --"):
            return True
        above -= 1
    return False


def test_schema_accepts_the_defaults(chart):
    chart.validate_schema(yaml.safe_load(VALUES_FILE.read_text()))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": "two"}, "at '/replicas': got string, want integer"),
        ({"replicas": -1}, "at '/replicas': minimum"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"image": {"repository": ""}}, "at '/image/repository'"),
        ({"clusterwide": False}, "additional properties 'clusterwide' not allowed"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"liveness": {"port": 70000}}, "at '/liveness/port': maximum"),
        ({"sample": {"enabled": "yes"}}, "at '/sample/enabled': got string, want boolean"),
        (
            {"metrics": {"serviceMonitor": {"interval": "often"}}},
            "at '/metrics/serviceMonitor/interval'",
        ),
    ],
)
def test_schema_violations_are_refused_naming_the_value(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values, name="chatstream", namespace="chatstream-system")

    assert "values don't meet the specifications of the schema" in str(refused.value)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 2}, "replicas > 1 needs peering.enabled=true"),
        ({"watchNamespaces": ["team-a"]}, "watchNamespaces is only used with clusterWide=false"),
    ],
)
def test_inconsistent_values_are_refused_with_the_fix(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="chatstream", namespace="chatstream-system")
