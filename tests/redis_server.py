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

Production shapes, also on loopback and stopped by pid:

    with RedisClusterServers(masters=3) as cluster:   # redis-cli --cluster create
        cluster.url                                   # redis+cluster://127.0.0.1:<p1>,...
        cluster.nodes[0].url                          # one node behind a plain URL
    with SentinelSet(replicas=1, sentinels=3) as s:   # a primary, replicas, sentinels
        s.url                                         # redis+sentinel://127.0.0.1:<s1>,.../<svc>
        s.kill_primary()                              # SIGKILL: the sentinels fail over
        s.wait_for_failover(old_port)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from serve_app.local_server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def ping(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether a Redis on `host:port` answers PING (raw RESP: no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # up, wants AUTH
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
        extra_config: tuple[str, ...] | list[str] = (),
        sentinel: bool = False,
    ) -> None:
        """`extra_config`: more lines for redis.conf (cluster mode, replicaof ...);
        `sentinel`: run it as a Redis Sentinel (`extra_config` holds its `sentinel` lines)."""
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="chatstream-redis-")
        self.dir = Path(directory) if directory else Path(self._tmp.name)
        self.durable = durable
        self.startup_timeout_s = startup_timeout_s
        self.pidfile = self.dir / "redis.pid"
        self.log_path = self.dir / "redis.log"
        self.extra_config = list(extra_config)
        self.sentinel = sentinel
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
            f'pidfile "{self.pidfile}"',
            f'logfile "{self.log_path}"',
            "daemonize no",
        ]
        if not self.sentinel:
            lines += [
                'save ""',
                f"appendonly {'yes' if self.durable else 'no'}",
                "appendfsync always",
            ]
        return "\n".join(lines + self.extra_config) + "\n"

    def command(self) -> list[str]:
        return [REDIS_SERVER, str(self.config_path)] + (["--sentinel"] if self.sentinel else [])

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


def start_redis(durable: bool = False, attempts: int = 3, **options) -> RedisServer:
    """A started RedisServer on a free port (retried: another process may take the port)."""
    for attempt in range(attempts):
        server = RedisServer(durable=durable, **options)
        try:
            return server.__enter__()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _redis_cli(*args: str, timeout_s: float = 30.0) -> str:
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    done = subprocess.run(
        [cli, *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


class _Group:
    """Several servers started and stopped together (each by its own pid)."""

    servers: list[RedisServer]

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterServers(_Group):
    """A Redis Cluster on loopback: `masters` primaries (each with `replicas` replicas), the
    16384 slots split by `redis-cli --cluster create`."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        durable: bool = False,
    ) -> None:
        self.masters, self.replicas = masters, replicas
        cluster_config = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout_ms}",
            "cluster-require-full-coverage yes",
        ]
        # The cluster bus on a free port of its own (by default: the port + 10000).
        self.servers = [
            RedisServer(
                durable=durable, extra_config=[*cluster_config, f"cluster-port {free_port()}"]
            )
            for _ in range(masters * (1 + replicas))
        ]
        self.nodes = self.servers

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.nodes[: self.masters])
        return f"redis+cluster://{hosts}"

    def start(self) -> RedisClusterServers:
        for server in self.servers:
            server.start()
        _redis_cli(
            "--cluster",
            "create",
            *(f"127.0.0.1:{s.port}" for s in self.servers),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
            timeout_s=60,
        )
        for server in self.servers:
            _wait(
                lambda port=server.port: (
                    "cluster_state:ok" in _redis_cli("-p", str(port), "cluster", "info")
                ),
                30,
                f"cluster node {server.port} did not reach cluster_state:ok",
            )
        return self


class SentinelSet(_Group):
    """A primary with `replicas` replicas and `sentinels` Redis Sentinels watching it as
    `service` (quorum: a majority), with quick failure detection for tests."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        service: str = "chatstream",
        down_after_ms: int = 1000,
        durable: bool = False,
    ) -> None:
        self.service = service
        self.primary = RedisServer(durable=durable)
        self.data = [self.primary] + [
            RedisServer(durable=durable, extra_config=[f"replicaof 127.0.0.1 {self.primary.port}"])
            for _ in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            RedisServer(
                sentinel=True,
                extra_config=[
                    f"sentinel monitor {service} 127.0.0.1 {self.primary.port} {quorum}",
                    f"sentinel down-after-milliseconds {service} {down_after_ms}",
                    f"sentinel failover-timeout {service} 10000",
                    f"sentinel parallel-syncs {service} 1",
                ],
            )
            for _ in range(sentinels)
        ]
        self.servers = self.data + self.sentinels

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def _sentinel(self, index: int):
        import redis

        return redis.Redis(port=self.sentinels[index].port, socket_timeout=2, decode_responses=True)

    def primary_port(self, index: int = 0) -> int:
        """The primary's port, as sentinel `index` sees it."""
        with self._sentinel(index) as sentinel:
            return int(sentinel.sentinel_get_master_addr_by_name(self.service)[1])

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.data if s.port == port)

    def _sees_everyone(self, index: int) -> bool:
        """Sentinel `index` knows the other sentinels (for a quorum) and the live replicas
        (to promote one)."""
        with self._sentinel(index) as sentinel:
            others = sentinel.sentinel_sentinels(self.service)
            replicas = [
                r
                for r in sentinel.sentinel_slaves(self.service)
                if "s_down" not in r["flags"] and r.get("master-link-status") == "ok"
            ]
        return len(others) >= len(self.sentinels) - 1 and len(replicas) >= len(self.data) - 1

    def start(self) -> SentinelSet:
        for server in self.data:
            server.start()
        for replica in self.data[1:]:
            _wait(
                lambda r=replica: (
                    "master_link_status:up" in _redis_cli("-p", str(r.port), "info", "replication")
                ),
                30,
                f"replica {replica.port} did not sync",
            )
        for sentinel in self.sentinels:
            sentinel.start()
        for index in range(len(self.sentinels)):
            _wait(
                lambda i=index: self._sees_everyone(i),
                30,
                f"sentinel {index} did not find the other sentinels and the replicas",
            )
        return self

    def describe(self, directory: Path) -> Path:
        """Write `<directory>/sentinel.json` (the service, the sentinels' ports, each data
        server's port and directory): what the load test's fault injector (`loadtest.fault
        --kind redis-kill --redis-dir <directory>`) needs to kill the primary from outside."""
        path = Path(directory) / "sentinel.json"
        path.write_text(
            json.dumps(
                {
                    "service": self.service,
                    "sentinels": [s.port for s in self.sentinels],
                    "servers": [{"port": s.port, "dir": str(s.dir)} for s in self.data],
                }
            )
        )
        return path

    def kill_primary(self) -> int:
        """SIGKILL the current primary (a crash); returns its port."""
        port = self.primary_port()
        self.server_on(port).stop(hard=True)
        return port

    def failover_done(self, index: int) -> int | None:
        """The primary's port once sentinel `index` has finished a failover, else None.

        `get-master-addr-by-name` already names the promoted replica while the failover is
        still under way; `SENTINEL MASTER` flags it s_down/failover_in_progress until the
        switch, and redis-py's Sentinel client finds no primary in that window."""
        with self._sentinel(index) as sentinel:
            state = sentinel.sentinel_master(self.service)
        ready = state["is_master"] and not (state["is_sdown"] or state["is_odown"])
        return int(state["port"]) if ready else None

    def request_failover(self) -> bool:
        """Ask sentinel 0 for a failover (`SENTINEL FAILOVER`); False while it has no replica
        it would promote (NOGOODSLAVE) or a failover is under way."""
        import redis

        try:
            with self._sentinel(0) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", self.service)
        except redis.ResponseError:
            return False
        return True

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until every sentinel has finished failing over to a primary that answers as
        one; its port."""

        def promoted() -> bool:
            ports = {self.failover_done(i) for i in range(len(self.sentinels))}
            if len(ports) != 1 or old_port in ports or None in ports:
                return False
            role = _redis_cli("-p", str(next(iter(ports))), "role")
            return role.startswith("master")

        _wait(promoted, timeout_s, "the sentinels did not fail over")
        return self.primary_port()
