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
