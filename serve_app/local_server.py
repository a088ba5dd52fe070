"""Run the Serve application as a child `serve run` process on a chosen loopback port.

Used by tests, the load test and the benchmark: they start exactly the command a user runs,
wait until it answers, and stop it by its own process id (SIGINT lets `serve run` shut Serve
and its private Ray cluster down cleanly).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from chatstream_defaults import ray_serve_env
from serve_app.config import APP_IMPORT_PATH, DEFAULT_APP_NAME, parse_args


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A port picked here is bound later by another process (Serve's proxy, a Redis, a Ray
# daemon). Picked from the kernel's ephemeral range, it can be taken in between by any
# outgoing connection or by one of Ray's own daemons, which bind random ephemeral ports while
# `serve run` starts (seen in CI: a gRPC answer on the HTTP port). So pick below that range
# and above Ray's worker ports (`ray start --min/max-worker-port`: 10002-19999).
_PICK_FROM = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def port_pick_range() -> range:
    """The ports `free_port` picks from: above Ray's workers, below the ephemeral range."""
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    return range(_PICK_FROM, max(ephemeral_low, _PICK_FROM + 1000))


def free_port() -> int:
    """A loopback port that is free now, outside the ports the kernel and Ray hand out."""
    candidates = port_pick_range()
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {candidates}: free some, or widen the range")


def serve_config(
    args: dict[str, Any],
    port: int,
    host: str = "127.0.0.1",
    import_path: str = APP_IMPORT_PATH,
) -> dict[str, Any]:
    """A Serve config file (ServeDeploySchema) that runs ChatStream with `args` on `port`."""
    parse_args(args)  # fail here, with a clear message, rather than inside the child process
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": DEFAULT_APP_NAME,
                "route_prefix": "/",
                "import_path": import_path,
                "args": args,
            }
        ],
    }


class LocalServe:
    """`with LocalServe({"engine": "mock"}) as server: httpx.get(server.url + "/load")`."""

    def __init__(
        self,
        args: dict[str, Any],
        port: int | None = None,
        startup_timeout_s: float = 180.0,
        log_path: str | os.PathLike | None = None,
        import_path: str = APP_IMPORT_PATH,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.extra_env = dict(env or {})  # e.g. secrets: CHATSTREAM_REDIS_URL
        self.import_path = import_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="chatstream-serve-")
        self.log_path = Path(log_path) if log_path else Path(self._dir.name) / "serve.log"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServe:
        config_path = Path(self._dir.name) / "serve_config.yaml"
        config_path.write_text(
            yaml.safe_dump(serve_config(self.args, self.port, import_path=self.import_path))
        )
        serve_bin = Path(sys.executable).with_name("serve")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.update(self.extra_env)
        env.update(ray_serve_env(env))  # what `serve run serve_app:app` gets (builder.app)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [str(serve_bin), "run", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # A shell that runs us in the background ignores SIGINT, and children inherit
            # that: `serve run` would then never hear our Ctrl-C. Give it the default back.
            preexec_fn=_default_sigint,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"`serve run` exited with {self._proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"service not ready after {self.startup_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # `serve run` tears Serve and Ray down on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
                proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        self._dir.cleanup()
