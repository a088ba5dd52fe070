"""Fixtures for the chart tests: render helm/chatstream with Helm's own Go SDK (helm-python-sdk).

`render(values)` is what `helm template chatstream helm/chatstream -n chatstream-system -f ...`
prints, as a list of parsed manifests (NOTES.txt and empty documents left out). No cluster and
no helm binary are involved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "chatstream"
CRD_FILE = CHART_DIR / "crds" / "chatstreams.chatstream.dev.yaml"

RELEASE = "chatstream"
NAMESPACE = "chatstream-system"

# Value sets a user would try; every test that loops over "all of them" uses these.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"clusterWide": False, "watchNamespaces": ["team-a", "team-b"]},
    "namespaced-release-namespace": {"clusterWide": False},
    "sample": {"sample": {"enabled": True}},
    "custom-images": {
        "image": {"repository": "registry.example.com/ml/chatstream-operator", "tag": "1.2.3"},
        "serveImage": {"repository": "registry.example.com/ml/chatstream-serve", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "regcred"}],
        "sample": {"enabled": True},
    },
    "peering": {"replicas": 2, "peering": {"enabled": True}},
    "peering-namespaced": {
        "replicas": 2,
        "peering": {"enabled": True},
        "clusterWide": False,
        "watchNamespaces": ["team-a"],
    },
    "redis": {
        "redis": {"enabled": True},
        "sample": {"enabled": True},
        "allowedImageRepositories": ["registry.example.com/ml", "docker.io/chatstream"],
        "networkPolicy": {
            "metricsPeers": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ]
        },
    },
    "redis-namespaced": {
        "redis": {"enabled": True, "gcsFaultTolerance": False},
        "clusterWide": False,
        "watchNamespaces": ["team-a", "team-b"],
        "sample": {"enabled": True},
        "tests": {
            "adminTokenSecret": {"name": "chat-admin", "key": "token"},
            "apiKeysSecret": {"name": "chat-api-keys", "key": "keys"},
        },
    },
    "no-network-policy": {"networkPolicy": {"enabled": False}},
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
    },
}


def pytest_generate_tests(metafunc):
    """A test that takes `value_set` runs once per entry of VALUE_SETS: (name, values)."""
    if "value_set" in metafunc.fixturenames:
        metafunc.parametrize("value_set", list(VALUE_SETS.items()), ids=list(VALUE_SETS))


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def parse_manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Parse Helm's {template path: text} output into manifests, in template-path order."""
    manifests = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return manifests


@pytest.fixture(scope="session")
def render(chart) -> Callable[..., list[dict[str, Any]]]:
    def _render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE):
        return parse_manifests(chart.render(values or {}, name=RELEASE, namespace=namespace))

    return _render


@pytest.fixture(scope="session")
def notes(chart) -> Callable[..., str]:
    def _notes(values: dict[str, Any] | None = None) -> str:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
        return rendered[f"{chart.name}/templates/NOTES.txt"]

    return _notes


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())
