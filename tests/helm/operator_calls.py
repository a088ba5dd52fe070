"""Run the real operator against kmock and write the API calls it made, as JSON, to a file.

    python tests/helm/operator_calls.py lifecycle OUT.json [--namespace NS ...]
    python tests/helm/operator_calls.py peering OUT.json -- OPERATOR-ARGS...

`lifecycle` is the operator's integration scenario (tests/operator/harness.py): standalone,
create / scale / status / drift / invalid spec / delete. `peering` starts the operator with the
given command-line arguments (those of the chart's Deployment, with --peering) against the
peering objects the chart creates, and stops it after its first heartbeat.

test_rbac.py runs this in a subprocess: kopf and the kubernetes client keep process-wide state
(the handler registry, the client's default configuration), so each run gets a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import kmock
import yaml
from kubernetes.config import kube_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from harness import RESOURCES, VERBS, ApiCall, api_call, run_operator_lifecycle  # noqa: E402

PEERING_RESOURCES = {
    "kopf.dev/v1/clusterkopfpeerings": {
        "kind": "ClusterKopfPeering", "singular": "clusterkopfpeering", "namespaced": False},
    "kopf.dev/v1/kopfpeerings": {
        "kind": "KopfPeering", "singular": "kopfpeering", "namespaced": True},
}  # fmt: skip
SETUP_HEADER = "X-Test-Setup"  # marks this script's own requests, which are not the operator's


@contextlib.contextmanager
def kubeconfig_for(url: str):
    """Point the operator's login (kubeconfig) at the emulator, never at a real cluster."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        os.environ["KUBECONFIG"] = str(path)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        # `kubernetes` reads KUBECONFIG once, when it is first imported.
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
        yield


async def run_peered_operator(operator_args: list[str]) -> list[ApiCall]:
    from chatstream_operator.__main__ import parse_args

    args = parse_args(operator_args)
    assert args.peering, "the operator is not told to peer"
    async with (
        kmock.KubernetesEmulator() as emulator,
        kmock.Server(emulator, host="127.0.0.1") as server,
    ):
        for resource, info in {**RESOURCES, **PEERING_RESOURCES}.items():
            emulator.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)
        if args.namespaces:
            kind = "KopfPeering"
            paths = [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings" for ns in args.namespaces]
        else:
            kind, paths = "ClusterKopfPeering", ["/apis/kopf.dev/v1/clusterkopfpeerings"]
        for path in paths:
            body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": args.peering}}
            async with emulator.request("POST", path, json=body, headers={SETUP_HEADER: "1"}):
                pass

        def calls() -> list[ApiCall]:
            setup = SETUP_HEADER.lower()
            requests = [r for r in emulator if setup not in {h.lower() for h in r.headers}]
            return [c for r in requests for c in [api_call(r)] if c is not None]

        with kubeconfig_for(str(server.url)):
            import kopf
            from chatstream_operator import handlers  # noqa: F401  (registers the handlers)
            from chatstream_operator.__main__ import operator_kwargs

            stop, ready = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(
                kopf.operator(stop_flag=stop, ready_flag=ready, **operator_kwargs(args))
            )
            try:
                await asyncio.wait_for(ready.wait(), timeout=30)
                deadline = time.monotonic() + 20
                while not any(c.group == "kopf.dev" and c.verb == "patch" for c in calls()):
                    if time.monotonic() > deadline:
                        raise AssertionError("the operator sent no peering heartbeat in 20s")
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=15)
                task.cancel()
        return calls()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["lifecycle", "peering"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--namespace", action="append", dest="namespaces")
    parser.add_argument("operator_args", nargs="*")
    args = parser.parse_args()
    if args.scenario == "lifecycle":
        calls = asyncio.run(run_operator_lifecycle(namespaces=args.namespaces))
    else:
        calls = asyncio.run(run_peered_operator(args.operator_args))
    args.out.write_text(json.dumps([call._asdict() for call in calls]))


if __name__ == "__main__":
    main()
