"""The chart's optional Redis, the NetworkPolicy and allow-list values, and the helm test's token.

The Redis container's command runs here on Debian's redis-server (the test setup installs it):
with the rendered command, the password from the environment, and a probe as the kubelet would
run it. (Lint and kubernetes-validate run over these values in test_values.py and
test_manifests.py: VALUE_SETS "redis", "redis-namespaced", "no-network-policy".)
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chatstream_operator.__main__ import operator_kwargs, parse_args
from chatstream_operator.render import render_rayservice
from conftest import NAMESPACE, VALUE_SETS

from serve_app.local_server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from crd_schema import KUBERAY_CRD_PATH, errors, load_crd, validator_for  # noqa: E402

REDIS = "chatstream-redis"


def of_kind(manifests, kind):
    return [m for m in manifests if m["kind"] == kind]


def only(manifests, kind, name=None):
    (found,) = [m for m in of_kind(manifests, kind) if name in (None, m["metadata"]["name"])]
    return found


def decoded(secret) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_no_redis_unless_asked_for(render):
    manifests = render()
    assert not [m for m in manifests if "redis" in m["metadata"]["name"]]


def test_redis_is_a_non_root_statefulset_with_a_volume(render):
    manifests = render(VALUE_SETS["redis"])
    sts = only(manifests, "StatefulSet")
    assert sts["metadata"]["name"] == REDIS and sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts["/data"] == claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # The password only ever comes from the Secret.
    for env in container["env"]:
        assert env["valueFrom"]["secretKeyRef"] == {"name": REDIS, "key": "password"}
    assert sts["spec"]["selector"]["matchLabels"].items() <= (
        sts["spec"]["template"]["metadata"]["labels"].items()
    )
    service = only(manifests, "Service")
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def test_the_generated_secret_holds_the_password_and_the_url(render):
    manifests = render(VALUE_SETS["redis"])
    secret = decoded(only(manifests, "Secret"))
    assert len(secret["password"]) >= 32 and secret["password"].isalnum()
    assert secret["url"] == (f"redis://:{secret['password']}@{REDIS}.{NAMESPACE}.svc:6379/0")
    assert secret["password"] != decoded(only(render(VALUE_SETS["redis"]), "Secret"))["password"]


def test_every_client_namespace_gets_the_same_secret(render):
    manifests = render(VALUE_SETS["redis-namespaced"])
    secrets = of_kind(manifests, "Secret")
    assert sorted(s["metadata"]["namespace"] for s in secrets) == sorted(
        [NAMESPACE, "team-a", "team-b"]
    )
    assert len({decoded(s)["url"] for s in secrets}) == 1
    custom = render({"redis": {"enabled": True, "clientNamespaces": ["chat"]}})
    assert {s["metadata"]["namespace"] for s in of_kind(custom, "Secret")} == {NAMESPACE, "chat"}


def test_the_redis_network_policy_admits_only_chatstream_pods(render):
    policy = only(render(VALUE_SETS["redis-namespaced"]), "NetworkPolicy")
    sts = only(render(VALUE_SETS["redis-namespaced"]), "StatefulSet")
    assert policy["spec"]["podSelector"] == sts["spec"]["selector"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["podSelector"] == {
        "matchExpressions": [{"key": "chatstream.dev/name", "operator": "Exists"}]
    }
    (namespaces,) = peer["namespaceSelector"]["matchExpressions"]
    assert namespaces["key"] == "kubernetes.io/metadata.name"
    assert namespaces["values"] == ["team-a", "team-b"]


def test_the_sample_uses_the_chart_redis_and_renders_for_kuberay(render):
    sample = only(render(VALUE_SETS["redis"]), "ChatStream")
    spec = sample["spec"]
    assert spec["session"] == {
        "store": "redis",
        "redisUrlSecretRef": {"name": REDIS, "key": "url"},
    }
    assert spec["gcsFaultTolerance"] == {
        "redisAddress": f"{REDIS}.{NAMESPACE}.svc:6379",
        "redisPasswordSecretRef": {"name": REDIS, "key": "password"},
    }
    rayservice = render_rayservice(sample["metadata"]["name"], spec)
    assert errors(validator_for(load_crd(KUBERAY_CRD_PATH), "v1"), rayservice) == []
    without_ft = only(render(VALUE_SETS["redis-namespaced"]), "ChatStream")["spec"]
    assert "gcsFaultTolerance" not in without_ft and without_ft["session"]["store"] == "redis"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_redis_command_runs_and_requires_the_password(render, tmp_path):
    """The container's own command (paths and port moved into a temporary directory)."""
    (container,) = only(render(VALUE_SETS["redis"]), "StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ]
    port = free_port()
    (tmp_path / "data").mkdir()
    script = (
        container["command"][2]
        .replace("/tmp/", f"{tmp_path}/")
        .replace("/data", f"{tmp_path}/data")
    )
    script = script.replace("--port 6379", f"--port {port} --bind 127.0.0.1")
    password = "Pa55word" * 4
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    server = subprocess.Popen(
        [*container["command"][:2], script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        probe = container["readinessProbe"]["exec"]["command"]
        probe = [part.replace("-p 6379", f"-p {port}") for part in probe]
        deadline = time.monotonic() + 20
        while subprocess.run(probe, env={**env, "REDISCLI_AUTH": password}).returncode != 0:
            assert time.monotonic() < deadline, "redis never answered the readiness probe"
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.1)
        anonymous = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "set", "k", "v"],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"]},
        )
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr
        assert password not in " ".join(server.args[:2])  # not on the command line
        info = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "config", "get", "appendonly"],
            capture_output=True,
            text=True,
            env={**env, "REDISCLI_AUTH": password},
        )
        assert info.stdout.split() == ["appendonly", "yes"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def _operator_args(manifests) -> list[str]:
    (deployment,) = of_kind(manifests, "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_allow_list_and_peers_reach_the_operator(render):
    from chatstream_operator import handlers
    from chatstream_operator.network import DEFAULT_CONTROL_PLANE_PEERS
    from chatstream_operator.options import options_of

    values = VALUE_SETS["redis"]
    options = options_of(operator_kwargs(parse_args(_operator_args(render(values))))["memo"])
    assert list(options.allowed_image_repositories) == values["allowedImageRepositories"]
    assert options.network_policy
    assert list(options.control_plane_peers) == DEFAULT_CONTROL_PLANE_PEERS
    assert list(options.metrics_peers) == values["networkPolicy"]["metricsPeers"]
    assert handlers.validate({"image": "docker.io/evil:1"}, options.allowed_image_repositories)
    # The chart's own sample image is in the list.
    sample = only(render(values), "ChatStream")
    assert handlers.validate(sample["spec"], options.allowed_image_repositories) == []


def test_without_network_policies_the_operator_neither_renders_nor_may_touch_them(render):
    manifests = render(VALUE_SETS["no-network-policy"])
    assert "--no-network-policy" in _operator_args(manifests)
    assert parse_args(_operator_args(manifests)).network_policy is False
    rules = [r for m in manifests for r in m.get("rules", [])]
    assert not [r for r in rules if "networkpolicies" in r["resources"]]
    assert [r for m in render() for r in m.get("rules", []) if "networkpolicies" in r["resources"]]


def test_helm_test_reads_the_admin_token_beside_the_chatstream(render):
    pod = only(render(VALUE_SETS["redis-namespaced"]), "Pod")
    assert pod["metadata"]["namespace"] == "team-a"  # where the ChatStream and its Secret are
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "chat-admin", "key": "token"}
    assert env["ADMIN_URL"]["value"] == "http://chat-serve-svc.team-a.svc:8000"
    assert env["API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "chat-api-keys", "key": "keys"}
    default = only(render(), "Pod")
    (token,) = [e for e in default["spec"]["containers"][0]["env"] if e["name"] == "ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "chat-chatstream", "key": "admin-token"}
    assert "API_KEYS" not in {e["name"] for e in default["spec"]["containers"][0]["env"]}


def test_notes_warn_when_metrics_cannot_pass_the_network_policy(notes):
    monitored = {"metrics": {"podMonitor": {"enabled": True}}}
    assert "networkPolicy.metricsPeers is empty" in notes(monitored)
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}]
    assert "WARNING" not in notes({**monitored, "networkPolicy": {"metricsPeers": peers}})
    assert "WARNING" not in notes()
