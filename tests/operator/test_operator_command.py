"""The installed `chatstream-operator` command, as the Deployment runs it, against kmock:
it logs in through a kubeconfig, serves its liveness endpoint, reconciles, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
import time

import aiohttp
import kmock
import pytest
import yaml
from harness import HARNESS_HEADER, NAMESPACE, RESOURCES, SPEC, VERBS

from serve_app.local_server import free_port

pytestmark = pytest.mark.timeout(90)

COMMAND = pathlib.Path(sys.executable).with_name("chatstream-operator")


async def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen in {timeout}s")


async def test_the_command_runs_the_operator(tmp_path):
    assert COMMAND.exists(), "pip install -e . installs the console script"
    async with (
        kmock.KubernetesEmulator() as emulator,
        kmock.Server(emulator, host="127.0.0.1") as server,
    ):
        for resource, info in RESOURCES.items():
            emulator.resources[resource] = kmock.ResourceInfo(verbs=VERBS, **info)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "k", "cluster": {"server": str(server.url)}}],
                    "users": [{"name": "k", "user": {"token": "t"}}],
                    "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k"}}],
                    "current-context": "k",
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env["KUBECONFIG"] = str(kubeconfig)
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        process = await asyncio.create_subprocess_exec(
            str(COMMAND),
            f"--namespace={NAMESPACE}",
            f"--liveness={liveness}",
            "--standalone",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as http:

                async def alive() -> bool:
                    try:
                        async with http.get(liveness) as response:
                            return response.status == 200
                    except aiohttp.ClientError:
                        return False

                await _until(alive, 30, "the liveness endpoint answering 200")

            body = {
                "apiVersion": "chatstream.dev/v1alpha1",
                "kind": "ChatStream",
                "metadata": {"name": "cli", "namespace": NAMESPACE, "uid": "u-cli",
                             "generation": 1, "resourceVersion": "1"},
                "spec": SPEC,
            }  # fmt: skip
            path = f"/apis/chatstream.dev/v1alpha1/namespaces/{NAMESPACE}/chatstreams"
            async with emulator.request("POST", path, json=body, headers={HARNESS_HEADER: "1"}):
                pass
            key = ("ray.io/v1/rayservices", NAMESPACE, "cli")

            async def rendered() -> bool:
                try:
                    return not emulator.objects[key].deleted
                except KeyError:
                    return False

            await _until(rendered, 30, "the RayService being created")
        except AssertionError as e:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
            raise AssertionError(f"{e}; the operator said:\n{stderr.decode()[-3000:]}") from e
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()[-3000:]
