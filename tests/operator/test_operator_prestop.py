"""A node drain cuts no stream: each model pod's preStop hook drains its Ray node first (Serve
moves the replica, which finishes its streams) and waits for the replica to be gone, within a
deadline that fits the pod's grace period. The hook's script is run here for real with `/bin/sh`,
a stand-in `ray` on PATH that records its arguments, and a process titled like a Serve replica."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from chatstream_operator.drain import POD_STOP_SLACK_SEC, drain_bounds
from chatstream_operator.pods import drain_hook
from chatstream_operator.render import render_rayservice


def _pods(rayservice: dict) -> tuple[dict, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"][
        "spec"
    ]


@pytest.mark.parametrize(
    "spec",
    [{}, {"generation": {"maxNewTokens": 2048}}, {"drain": {"timePerTokenSec": 0.01}}],
    ids=["default", "long-answers", "fast-tokens"],
)
def test_model_pods_drain_ray_before_they_stop_within_their_grace(spec):
    bounds = drain_bounds(spec)
    head, worker = _pods(render_rayservice("chat", spec))
    (container,) = worker["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    script = command[2]
    assert "ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION" in script
    deadline = bounds.worker_drain_deadline_s
    assert f"--deadline-remaining-seconds={deadline}" in script
    # Serve stops a migrating replica by the deadline less its graceful shutdown bound: the
    # whole answer bound fits between the hook's start and the deadline, and Ray's own stop
    # between the deadline and the kill.
    assert bounds.answer_s <= deadline
    assert deadline + POD_STOP_SLACK_SEC <= worker["terminationGracePeriodSeconds"]
    # The head's ingress replicas can run nowhere else: nothing to migrate, no hook.
    assert "lifecycle" not in head["containers"][0]


# The hook looks at every process it can see: in a pod, the pod's own. Here it runs in its own
# PID namespace (as root, like this machine and CI), so other Ray processes on the machine
# cannot keep it waiting.
ISOLATED = ["unshare", "--pid", "--fork", "--mount-proc"]


def _run_hook(tmp_path, deadline_s: int, replica_lifetime_s: float | None) -> tuple[float, str]:
    """Run the hook's script; return (seconds it took, the arguments `ray` got)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ray-calls"
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake_ray.chmod(0o755)
    hook = drain_hook(deadline_s)["preStop"]["exec"]["command"]
    # A process titled like Serve's model replica, which exits once its streams end.
    replica = (
        f'(exec -a "ray::ServeReplica:chatstream:ChatModel" sleep {replica_lifetime_s}) & '
        "sleep 0.2; "
        if replica_lifetime_s is not None
        else ""
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOSTNAME": "chat-model-x"}
    started = time.monotonic()
    subprocess.run(
        [*ISOLATED, "bash", "-c", f'{replica}"$@"', "hook", *hook],
        env=env,
        check=True,
        timeout=60,
    )
    return time.monotonic() - started, calls.read_text()


def test_the_hook_waits_for_the_replica_to_finish(tmp_path):
    took, ray_args = _run_hook(tmp_path, deadline_s=20, replica_lifetime_s=2)
    assert ray_args.split() == [
        "drain-node", "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=Kubernetes", "stops", "pod", "chat-model-x",
        "--deadline-remaining-seconds=20",
    ]  # fmt: skip
    assert 1.5 <= took < 15  # it waited for the replica, not for the deadline


def test_the_hook_gives_up_at_the_deadline(tmp_path):
    took, _ = _run_hook(tmp_path, deadline_s=2, replica_lifetime_s=25)
    assert 1.5 <= took < 10


def test_a_pod_without_a_replica_stops_at_once(tmp_path):
    took, ray_args = _run_hook(tmp_path, deadline_s=20, replica_lifetime_s=None)
    assert ray_args.startswith("drain-node") and took < 5
