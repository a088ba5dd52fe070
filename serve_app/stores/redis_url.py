"""Which Redis the store talks to, from one URL (the environment variable CHATSTREAM_REDIS_URL):

    redis://[[user]:password@]host[:6379][/db]            one server (or a managed primary endpoint)
    rediss://...                                          the same over TLS
    unix:///path/to/redis.sock[?db=0]                     a local socket
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                          a Redis Cluster (any nodes: the client
                                                          learns the rest and follows MOVED/ASK)
    rediss+cluster://...                                  the same over TLS
    redis+sentinel://[[user]:password@]host:26379[,host:26379...]/<service>[/db]
                                                          a primary found through Sentinel
    rediss+sentinel://...                                 the same over TLS (sentinels and data)

ChatStream's own options, in the query string (removed before redis-py sees the URL):

    wait_replicas=N      after an outcome is written, WAIT until N replicas have it (default:
                         1 behind Sentinel, else 0); fewer within the timeout is a failed write
                         that the ingress retries
    wait_timeout_ms=M    how long to WAIT (default 500)
    sentinel_password=P, sentinel_username=U
                         credentials of the sentinels themselves (the URL's are the data nodes')

The password stays in the URL, which reaches the app through the environment (a Secret), never
through the Serve config. `describe()` names the target without credentials, for messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

Mode = Literal["standalone", "cluster", "sentinel"]

DEFAULT_WAIT_TIMEOUT_MS = 500
_OUR_OPTIONS = ("wait_replicas", "wait_timeout_ms", "sentinel_password", "sentinel_username")
_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}


@dataclass(frozen=True)
class RedisTarget:
    mode: Mode
    url: str  # standalone: the URL for redis-py, without ChatStream's options
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: startup nodes; sentinel: the sentinels
    service: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Where it points, without credentials (for log lines and refusals)."""
        if self.mode == "standalone":
            parts = urlsplit(self.url)
            host = parts.netloc.rpartition("@")[2]
            return f"{parts.scheme}://{host}{parts.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "cluster":
            return f"{'rediss' if self.ssl else 'redis'}+cluster://{hosts}"
        return f"{'rediss' if self.ssl else 'redis'}+sentinel://{hosts}/{self.service}"


def _hosts(netloc: str, default_port: int, setting: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = port, ""
        host = host.strip("[]")  # IPv6 literal
        if not host:
            raise ValueError(f"{setting}: a host is missing in {netloc!r}")
        try:
            nodes.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"{setting}: bad port in {item!r}") from None
    return tuple(nodes)


def parse_redis_url(url: str, setting: str = "CHATSTREAM_REDIS_URL") -> RedisTarget:
    """Parse the store's URL; ValueError (naming `setting`) if it cannot be used."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"{setting}: unknown scheme {parts.scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
        )
    mode, ssl = _SCHEMES[scheme]
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _OUR_OPTIONS}
    rest = [(k, v) for k, v in query if k not in _OUR_OPTIONS]
    try:
        wait_replicas = int(ours.get("wait_replicas", 1 if mode == "sentinel" else 0))
        wait_timeout_ms = int(ours.get("wait_timeout_ms", DEFAULT_WAIT_TIMEOUT_MS))
    except ValueError:
        raise ValueError(f"{setting}: wait_replicas and wait_timeout_ms are integers") from None
    if wait_replicas < 0 or wait_timeout_ms <= 0:
        raise ValueError(f"{setting}: wait_replicas >= 0 and wait_timeout_ms > 0")
    common: dict[str, Any] = {
        "mode": mode,
        "ssl": ssl,
        "wait_replicas": wait_replicas,
        "wait_timeout_ms": wait_timeout_ms,
    }
    if mode == "standalone":
        stripped = urlunsplit(parts._replace(query=urlencode(rest)))
        return RedisTarget(url=stripped, **common)

    credentials, _, netloc = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    if rest:
        raise ValueError(
            f"{setting}: unknown option(s) {', '.join(k for k, _ in rest)} for {scheme}:// "
            f"(known: {', '.join(_OUR_OPTIONS)})"
        )
    path = [p for p in parts.path.split("/") if p]
    if mode == "cluster":
        if path and path != ["0"]:
            raise ValueError(f"{setting}: a Redis Cluster has database 0 only")
        nodes = _hosts(netloc, 6379, setting)
        service, db = "", 0
    else:
        if not path:
            raise ValueError(
                f"{setting}: name the Sentinel service, e.g. redis+sentinel://host:26379/mymaster"
            )
        nodes = _hosts(netloc, 26379, setting)
        service = unquote(path[0])
        try:
            db = int(path[1]) if len(path) > 1 else 0
        except ValueError:
            raise ValueError(f"{setting}: the database after the service is a number") from None
    return RedisTarget(
        url="",
        nodes=nodes,
        service=service,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=ours.get("sentinel_username") or None,
        sentinel_password=ours.get("sentinel_password") or None,
        **common,
    )
