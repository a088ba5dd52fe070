"""A private Ray cluster for tests that deploy Serve configs as an operator does: `ray start
--head --block` in a temporary directory, every port its own (other clusters may run on the
machine), Serve configs applied with the `serve deploy` CLI through its dashboard, exactly what
KubeRay does with a RayService's serveConfigV2. Stopped by its own process group: `ray start
--block` tears down what it started when it gets SIGTERM; never `ray stop`, which would stop
every cluster of the machine.

    with RayCluster(num_cpus=4, resources={"chatstream_model": 8}) as cluster:
        cluster.deploy(serve_config)          # `serve deploy`; proxy on cluster.http_port
        cluster.put(serve_config)             # the same request, without the CLI
        cluster.application("chatstream")     # GET /api/serve/applications/ (replicas, states)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.local_server import free_port

RAY_BIN = Path(sys.executable).with_name("ray")
SERVE_BIN = Path(sys.executable).with_name("serve")
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def cli_env() -> dict[str, str]:
    """The environment of the `ray` / `serve` commands: no RAY_ADDRESS of the caller's, and
    Ray's token authentication (on by default for local clusters; token in ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if "RAY_AUTH_MODE" not in env and TOKEN_FILE.exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN") or (
        TOKEN_FILE.read_text().strip() if TOKEN_FILE.exists() else ""
    )
    return {"Authorization": f"Bearer {token}"} if token else {}


class RayCluster:
    def __init__(
        self,
        num_cpus: float = 4,
        resources: dict[str, float] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.startup_timeout_s = startup_timeout_s
        # Short: Ray's socket paths live under it (108 characters at most).
        self._dir = tempfile.TemporaryDirectory(prefix="rc-", dir="/tmp")
        self.dir = Path(self._dir.name)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._proc: subprocess.Popen | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def command(self) -> list[str]:
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        command = [str(RAY_BIN), "start", "--head", "--block", "--disable-usage-stats"]
        for flag, port in ports.items():
            command += [flag, str(port)]
        return command + [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.num_cpus),
            "--resources",
            json.dumps(self.resources),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--temp-dir",
            str(self.dir),
        ]

    def __enter__(self) -> RayCluster:
        self._log = open(self.dir / "ray-start.log", "wb")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # A node that gets SIGTERM drains first (30 s by default): nothing to drain here.
            env={**cli_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"},
            start_new_session=True,  # its own process group: stopped as one, by its id
        )
        try:
            self._wait_for_dashboard()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_for_dashboard(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited: {self.log_tail()}")
            try:
                answer = httpx.get(
                    f"{self.dashboard_url}/api/version", headers=auth_headers(), timeout=2
                )
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"no dashboard after {self.startup_timeout_s}s: {self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "ray-start.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def serve_config(self, applications_config: dict[str, Any]) -> dict[str, Any]:
        """A rendered serveConfigV2 (`applications: [...]`) with this cluster's HTTP options."""
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            **applications_config,
        }

    def deploy(self, applications_config: dict[str, Any], name: str = "serve") -> None:
        """`serve deploy` the config (returns once the controller took it, as KubeRay's call)."""
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(self.serve_config(applications_config), sort_keys=False))
        done = subprocess.run(
            [str(SERVE_BIN), "deploy", str(path), "--address", self.dashboard_url],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"serve deploy failed: {done.stdout[-2000:]}{done.stderr[-4000:]}")

    def put(self, applications_config: dict[str, Any]) -> None:
        """The same config as `deploy`, PUT to the dashboard's Serve API directly: the request
        that `serve deploy` sends, and the one KubeRay sends when serveConfigV2 changes,
        without the seconds a CLI process needs to start on a busy machine."""
        answer = httpx.put(
            f"{self.dashboard_url}/api/serve/applications/",
            json=self.serve_config(applications_config),
            headers=auth_headers(),
            timeout=60,
        )
        answer.raise_for_status()

    def applications(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=10
        )
        answer.raise_for_status()
        return answer.json().get("applications") or {}

    def application(self, name: str) -> dict[str, Any] | None:
        return self.applications().get(name)

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Anything of the group still alive (the group is ours alone).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()
        self._dir.cleanup()
