"""A real Redis for tests and load tests: Debian's `redis-server` on a free loopback port, in a
temporary directory, stopped by its own process id (never by name).

    with RedisServer() as redis:            # or RedisServer(durable=True) for AOF
        url = redis.url                     # redis://127.0.0.1:<port>/0
        redis.stop()                        # Redis gone: the port refuses connections
        redis.start()                       # back on the same port and directory
        redis.restart(hard=True)            # SIGKILL (a crash), then start again
        with redis.frozen():                # SIGSTOP/SIGCONT: connections hang, nothing answers
            ...

Its configuration is a file in its directory (`redis.conf`), and every instance writes its pid
to `redis.pid` there, so a process that restarts it from outside (the load test's fault
injector, `python -m loadtest.fault redis --dir <dir>`) leaves a pid this object can still
stop: `stop()` reads the pidfile and stops that process, after checking it is a redis-server
on our port.
`durable=True` turns on the append-only file with `appendfsync always`: every acknowledged
write survives a restart or a SIGKILL of Redis itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether a Redis on `host:port` answers PING (raw RESP: no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _is_our_redis(pid: int, port: int) -> bool:
    """`pid` is a redis-server listening on `port` (so a stale pidfile never kills a stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    # redis-server retitles itself "redis-server 127.0.0.1:<port>"
    return b"redis-server" in cmdline and f":{port}".encode() in cmdline


class RedisServer:
    def __init__(
        self,
        port: int | None = None,
        directory: str | os.PathLike | None = None,
        durable: bool = False,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="chatstream-redis-")
        self.dir = Path(directory) if directory else Path(self._tmp.name)
        self.durable = durable
        self.startup_timeout_s = startup_timeout_s
        self.pidfile = self.dir / "redis.pid"
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.dir / "redis.conf"

    def config(self) -> str:
        """The server's configuration file: `redis-server <dir>/redis.conf` starts it again as
        it was (the load test's fault injector does so from another process)."""
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.dir}"',
            'save ""',
            f"appendonly {'yes' if self.durable else 'no'}",
            "appendfsync always",
            f'pidfile "{self.pidfile}"',
            f'logfile "{self.log_path}"',
            "daemonize no",
        ]
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        return [REDIS_SERVER, str(self.config_path)]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RedisServer:
        if self.running():
            return self
        self.pidfile.unlink(missing_ok=True)
        self.config_path.write_text(self.config())
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run is not delivered to it twice
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not ping(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop(hard=True)
                raise TimeoutError(f"redis-server did not answer PING:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def pid(self) -> int | None:
        """The pid of the Redis serving our port now: ours, or one a fault injector started."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) and _is_our_redis(pid, self.port) else None

    def running(self) -> bool:
        return self.pid() is not None

    def stop(self, hard: bool = False, timeout_s: float = 20.0) -> None:
        """Stop the server: SIGTERM (a clean shutdown; the AOF is flushed) or, with `hard`,
        SIGKILL (a crash). Returns once the process is gone and the port refuses."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGCONT)  # a frozen server cannot handle SIGTERM
            self._signal(pid, signal.SIGKILL if hard else signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self._alive(pid):
                if time.monotonic() > deadline:
                    self._signal(pid, signal.SIGKILL)
                    deadline = time.monotonic() + timeout_s
                time.sleep(0.02)
        self._proc = None
        self.pidfile.unlink(missing_ok=True)

    def restart(self, hard: bool = False, down_s: float = 0.0) -> None:
        """Stop and start again on the same port and directory (same data if durable)."""
        self.stop(hard=hard)
        if down_s:
            time.sleep(down_s)
        self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze the server (SIGSTOP): it accepts TCP connections but never answers."""
        pid = self.pid()
        assert pid is not None, "redis-server is not running"
        self._signal(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            self._signal(pid, signal.SIGCONT)

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # also reaps our own child
        return _pid_alive(pid)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_redis(durable: bool = False, attempts: int = 3) -> RedisServer:
    """A started RedisServer on a free port (retried: another process may take the port)."""
    for attempt in range(attempts):
        server = RedisServer(durable=durable)
        try:
            return server.__enter__()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
