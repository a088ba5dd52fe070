"""What `helm install chatstream helm/chatstream -n chatstream-system` creates, for the value sets
a user would try: default, namespaced RBAC, sample on, custom images, peering, monitoring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def only(manifests, kind):
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def named(manifests, kind):
    return sorted(
        (m["metadata"].get("namespace"), m["metadata"]["name"])
        for m in manifests
        if m["kind"] == kind
    )


def operator_container(manifests):
    return only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_default_install_creates_the_operator_with_cluster_wide_rbac(render):
    manifests = render()

    assert sorted(m["kind"] for m in manifests) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Pod",  # the helm test hook
        "ServiceAccount",
    ]
    binding = only(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == only(manifests, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chatstream", "namespace": "chatstream-system"}
    ]
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "chatstream"
    assert "--all-namespaces" in operator_container(manifests)["args"]


def test_operator_pod_is_locked_down(render):
    deployment = only(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(render())

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # One standalone operator: a rollout must not run the old and the new one side by side.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_liveness_probe_hits_the_endpoint_the_operator_is_told_to_serve(render):
    manifests = render({"liveness": {"port": 9090, "path": "/livez"}})
    container = operator_container(manifests)

    assert "--liveness=http://0.0.0.0:9090/livez" in container["args"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/livez"
    port = next(p for p in container["ports"] if p["name"] == probe["port"])
    assert port["containerPort"] == 9090


def test_namespaced_rbac_gives_a_role_per_watched_namespace(render):
    manifests = render({"clusterWide": False, "watchNamespaces": ["team-a", "team-b"]})

    assert named(manifests, "Role") == [("team-a", "chatstream"), ("team-b", "chatstream")]
    bindings = [m for m in manifests if m["kind"] == "RoleBinding"]
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings] == [
        ("team-a", "chatstream"),
        ("team-b", "chatstream"),
    ]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "chatstream-system"
    args = operator_container(manifests)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    # Nothing cluster-wide: the operator can be installed by a namespace admin (CRD aside).
    assert not {"ClusterRole", "ClusterRoleBinding"} & {m["kind"] for m in manifests}


def test_namespaced_without_a_list_watches_the_release_namespace(render):
    manifests = render({"clusterWide": False})

    assert named(manifests, "Role") == [("chatstream-system", "chatstream")]
    assert "--namespace=chatstream-system" in operator_container(manifests)["args"]


def test_sample_is_off_by_default_and_uses_the_serve_image_when_on(render):
    assert not [m for m in render() if m["kind"] == "ChatStream"]

    sample = only(render({"sample": {"enabled": True}}), "ChatStream")
    assert sample["apiVersion"] == "chatstream.dev/v1alpha1"
    assert sample["metadata"] == sample["metadata"] | {
        "name": "chat",
        "namespace": "chatstream-system",
    }
    assert sample["spec"]["engine"] == "mock"
    assert sample["spec"]["image"] == "docker.io/chatstream/chatstream-serve:0.1.0"


def test_custom_images_reach_the_operator_and_the_sample(render):
    manifests = render(
        {
            "image": {
                "repository": "registry.example.com/op",
                "tag": "1.2.3",
                "pullPolicy": "Always",
            },
            "serveImage": {"repository": "registry.example.com/serve", "tag": "1.2.4"},
            "imagePullSecrets": [{"name": "regcred"}],
            "sample": {"enabled": True},
        }
    )

    container = operator_container(manifests)
    assert container["image"] == "registry.example.com/op:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert only(manifests, "ChatStream")["spec"]["image"] == "registry.example.com/serve:1.2.4"


def test_sample_spec_can_override_the_image(render):
    sample = only(
        render({"sample": {"enabled": True, "spec": {"engine": "mock", "image": "mine:1"}}}),
        "ChatStream",
    )
    assert sample["spec"]["image"] == "mine:1"


def test_helm_test_pod_posts_a_chat_turn_to_the_sample_serve_service(render):
    pod = only(render(), "Pod")

    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["URL"] == "http://chat-serve-svc.chatstream-system.svc:8000/chat_stream"
    assert json.loads(env["BODY"])["user_input"]


def test_helm_test_pod_can_target_another_chatstream(render):
    pod = only(render({"tests": {"chatStreamName": "support-bot", "namespace": "team-a"}}), "Pod")

    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["URL"] == "http://support-bot-serve-svc.team-a.svc:8000/chat_stream"


def test_peering_runs_several_operators_against_one_peering_object(render):
    manifests = render({"replicas": 2, "peering": {"enabled": True, "name": "chat"}})

    assert only(manifests, "Deployment")["spec"]["replicas"] == 2
    assert "--peering=chat" in operator_container(manifests)["args"]
    assert only(manifests, "ClusterKopfPeering")["metadata"]["name"] == "chat"

    namespaced = render(
        {"peering": {"enabled": True}, "clusterWide": False, "watchNamespaces": ["a", "b"]}
    )
    assert named(namespaced, "KopfPeering") == [("a", "chatstream"), ("b", "chatstream")]


def test_without_peering_the_operator_runs_standalone(render):
    args = operator_container(render())["args"]
    assert "--standalone" in args
    assert not [a for a in args if a.startswith("--peering")]


def test_monitoring_objects_appear_only_when_asked_for(render):
    assert not {"ServiceMonitor", "PodMonitor", "ConfigMap"} & {m["kind"] for m in render()}

    manifests = render(
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True},
                "grafanaDashboard": {"enabled": True},
            }
        }
    )
    service_monitor = only(manifests, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    # KubeRay's head Services and worker pods name their metrics port "metrics".
    # The head Service KubeRay keeps for each RayService, and the ChatStream model pods.
    assert service_monitor["spec"]["selector"]["matchLabels"] == {
        "ray.io/originated-from-crd": "RayService",
        "ray.io/node-type": "head",
    }
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # ... of which only the ChatStreams' heads are kept (their pods carry chatstream.dev/name).
    (keep,) = service_monitor["spec"]["endpoints"][0]["relabelings"]
    assert keep == {
        "action": "keep",
        "sourceLabels": ["__meta_kubernetes_pod_label_chatstream_dev_name"],
        "regex": ".+",
    }
    from chatstream_operator.render import render_rayservice

    head = render_rayservice("chat", {})["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "chatstream.dev/name" in head["template"]["metadata"]["labels"]
    pod_monitor = only(manifests, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"chatstream.dev/component": "model"}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert service_monitor["spec"]["namespaceSelector"] == {"any": True}


def test_monitors_follow_the_watched_namespaces(render):
    manifests = render(
        {
            "clusterWide": False,
            "watchNamespaces": ["team-a"],
            "metrics": {"serviceMonitor": {"enabled": True}},
        }
    )
    assert only(manifests, "ServiceMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a"]
    }


def test_grafana_dashboard_charts_the_chatstream_metrics(render):
    configmap = only(render({"metrics": {"grafanaDashboard": {"enabled": True}}}), "ConfigMap")

    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["chatstream.json"])
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    # Ray exports application metrics with a "ray_" prefix.
    for metric in (
        "ray_chatstream_outcomes_total",
        "ray_chatstream_time_to_first_token_seconds_bucket",
        "ray_chatstream_rejections_total",
        "ray_serve_deployment_queued_queries",
    ):
        assert metric in queries
    assert "by (outcome)" in queries and "by (reason)" in queries


def test_names_follow_the_release(render):
    manifests = render({"fullnameOverride": "chat-op"})
    assert only(manifests, "Deployment")["metadata"]["name"] == "chat-op"
    assert only(manifests, "ServiceAccount")["metadata"]["name"] == "chat-op"


def test_rbac_and_service_account_can_be_brought_by_the_user(render):
    manifests = render(
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}
    )

    assert sorted(m["kind"] for m in manifests) == ["Deployment", "Pod"]
    assert only(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_notes_tell_the_next_commands(notes):
    text = notes()
    assert "kubectl -n chatstream-system rollout status deployment/chatstream" in text
    assert "kubectl -n chatstream-system get chatstreams" in text
    assert "port-forward service/chat-serve-svc 8000:8000" in text
    assert "helm test chatstream -n chatstream-system" in text

    assert "watches ChatStreams in: team-a" in notes(
        {"clusterWide": False, "watchNamespaces": ["team-a"]}
    )


def test_notes_sample_is_in_the_repository_and_is_what_helm_test_targets(render, notes):
    (path,) = re.findall(r"apply -f (\S+\.yaml)", notes())
    sample = yaml.safe_load((REPO / path).read_text())

    assert sample["kind"] == "ChatStream"
    (pod,) = [m for m in render() if m["kind"] == "Pod"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["URL"].startswith(f"http://{sample['metadata']['name']}-serve-svc.")


def test_pod_monitor_selects_the_model_pods_the_operator_renders(render):
    from chatstream_operator.render import render_rayservice

    values = {"metrics": {"podMonitor": {"enabled": True}}}
    selector = only(render(values), "PodMonitor")["spec"]["selector"]["matchLabels"]
    cluster = render_rayservice("chat", {"engine": "mock"})["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]

    assert selector.items() <= workers["template"]["metadata"]["labels"].items()
    assert (
        not selector.items() <= cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize(
    ("values", "scope"),
    [
        ({}, {"clusterwide": True}),
        ({"clusterWide": False, "watchNamespaces": ["a", "b"]}, {"namespaces": ["a", "b"]}),
    ],
)
def test_operator_command_line_takes_the_rendered_args(render, values, scope):
    from chatstream_operator.__main__ import operator_kwargs, parse_args

    container = operator_container(render(values))
    kwargs = operator_kwargs(parse_args(container["args"]))

    assert scope.items() <= kwargs.items()
    probe = container["livenessProbe"]["httpGet"]
    assert kwargs["liveness_endpoint"] == f"http://0.0.0.0:8080{probe['path']}"
    assert kwargs["standalone"] is True and kwargs["peering_name"] is None

    peered = operator_container(render({**values, "replicas": 2, "peering": {"enabled": True}}))
    kwargs = operator_kwargs(parse_args(peered["args"]))
    assert kwargs["peering_name"] == "chatstream" and kwargs["standalone"] is False


def test_example_chatstream_lives_in_a_watched_namespace(render, notes):
    values = {"clusterWide": False, "watchNamespaces": ["team-a"], "sample": {"enabled": True}}
    manifests = render(values)

    assert only(manifests, "ChatStream")["metadata"]["namespace"] == "team-a"
    container = only(manifests, "Pod")["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["URL"] == "http://chat-serve-svc.team-a.svc:8000/chat_stream"
    assert "kubectl -n team-a get chatstreams" in notes(values)
