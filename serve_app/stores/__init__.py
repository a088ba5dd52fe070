"""State stores behind one interface (`base.StateStore`); backends are imported when chosen."""

from __future__ import annotations

from serve_app.stores.base import StateStore, StoreMisconfigured, StoreSettings, StoreUnavailable

__all__ = [
    "StateStore",
    "StoreMisconfigured",
    "StoreSettings",
    "StoreUnavailable",
    "make_store",
]


def make_store(kind: str, settings: StoreSettings, redis_url: str = "") -> StateStore:
    """The store for `session_store=kind`. `redis_url` (from CHATSTREAM_REDIS_URL) names the
    shape of Redis: redis:// or rediss:// (one server), redis+cluster://host:port,... (a Redis
    Cluster), redis+sentinel://host:26379,.../<service> (a primary behind Sentinel); see
    `serve_app.stores.redis_url`. A URL that cannot be parsed raises ValueError here.

    At start, before serving, call `await store.verify()` once: it raises StoreMisconfigured
    (one line that names the setting and what to set) when the URL does not fit the server
    (a cluster behind a plain URL, a read-only replica, an unknown Sentinel service, bad
    credentials, unreachable for 10 s). The Redis store also runs that check on its first
    call (`signing_key()` at start) if nobody did."""
    if kind == "memory":
        from serve_app.stores.memory import MemoryStore

        return MemoryStore(settings)
    if kind == "ray":
        from serve_app.stores.ray_actor import RayStore

        return RayStore(settings)
    if kind == "redis":
        from serve_app.stores.redis_store import RedisStore

        return RedisStore(settings, redis_url)
    raise ValueError(f"unknown session_store {kind!r}")
