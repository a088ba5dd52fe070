"""The chart's README says what the chart does: its commands name objects and files that exist,
and its values table is values.yaml's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "chatstream"
README = (CHART_DIR / "README.md").read_text()


def leaf_paths(values: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths |= leaf_paths(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return paths


def test_values_table_matches_values_yaml():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    table = README.split("\n## Values\n", 1)[1]
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", table, re.MULTILINE))

    for key, default in rows.items():
        value = values
        for part in key.split("."):
            value = value[part]
        assert json.loads(default) == value, key
    for leaf in leaf_paths(values):
        assert any(leaf == key or leaf.startswith(f"{key}.") for key in rows), leaf


def test_files_the_readme_applies_exist():
    paths = re.findall(r"apply -f ([\w./-]+)", README)
    assert "operator/examples/chatstream-sample.yaml" in paths
    for path in paths:
        assert (REPO / path).exists(), path


def test_readme_commands_name_what_the_chart_renders(render):
    manifests = render()
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    (pod,) = [m for m in manifests if m["kind"] == "Pod"]
    url = next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "URL")
    sample = yaml.safe_load((REPO / "operator/examples/chatstream-sample.yaml").read_text())

    assert f"rollout status deployment/{deployment['metadata']['name']}" in README
    assert "helm install chatstream helm/chatstream -n chatstream-system" in README
    assert "helm test chatstream -n chatstream-system" in README
    assert f"`{url}`" in README
    assert f"wait chatstream/{sample['metadata']['name']} " in README


def test_rbac_table_lists_the_rendered_rules(render):
    peering = {"replicas": 2, "peering": {"enabled": True}}
    for values in (peering, {**peering, "clusterWide": False}):
        for manifest in render(values):
            for rule in manifest.get("rules", []):
                (group,), (resource,) = rule["apiGroups"], rule["resources"]
                (row,) = [line for line in README.splitlines() if f"`{resource}`" in line]
                shown_group = group or '""'  # the core API group
                assert f"`{shown_group}`" in row
                assert ", ".join(rule["verbs"]) in row
