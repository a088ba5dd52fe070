"""What the state store costs a user: time to first token through `serve run` with the mock
engine, per store (memory, ray, redis on one server, on a 3-node Redis Cluster and behind
Sentinel), at concurrency 1 and 8. One run, one machine.

    .venv/bin/python -m benchmarks.bench_store [--turns 40]

Each client has its own session and sends its turns one after another (so every turn takes
and releases the session's turn, and saves its answer). The Redis store runs against a local
Debian redis-server started by the script on a free loopback port (durable: append-only file,
fsync every write, as the chart's Redis would); `cluster` on three such primaries
(`redis+cluster://`, redis-cli --cluster create); `sentinel` on such a primary with one replica
and three sentinels (`redis+sentinel://`: outcomes and session changes WAIT for the replica).
Prints one table; the figures depend on the machine and on what else runs on it (the load
average is printed with them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import httpx

from serve_app.local_server import LocalServe
from tests.redis_server import RedisClusterServers, RedisServer, SentinelSet

ARGS = {
    "engine": "mock",
    "mock_mode": "echo",
    "mock_time_per_token_sec": 0.005,
    "max_new_tokens": 8,
    "max_ongoing_requests": 16,
}


def client_turns(url: str, turns: int, ttfts: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for index in range(turns):
            started = time.perf_counter()
            first = None
            with client.stream("POST", "/chat_stream", json={"user_input": f"t{index}"}) as r:
                for _ in r.iter_bytes():
                    first = first or time.perf_counter() - started
            assert r.status_code == 200 and first is not None, r.status_code
            ttfts.append(first)


def measure(url: str, concurrency: int, turns: int) -> list[float]:
    client_turns(url, 3, [])  # warm up
    ttfts: list[float] = []
    threads = [
        threading.Thread(target=client_turns, args=(url, turns, ttfts)) for _ in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ttfts


def store_calls(url: str, calls: int = 400) -> dict[str, float]:
    """p50 latency (ms) of the store's two writes per turn, called one after another from one
    client: a session change and an outcome."""
    import asyncio
    import uuid

    from serve_app.session_state import set_params
    from serve_app.stores import StoreSettings
    from serve_app.stores.redis_store import RedisStore

    async def run() -> dict[str, float]:
        store = RedisStore(StoreSettings(namespace=f"bench-{uuid.uuid4().hex[:8]}"), url)
        await store.verify()
        timings: dict[str, list[float]] = {"change_session": [], "record_outcome": []}
        try:
            for index in range(calls):
                started = time.perf_counter()
                await store.change_session(f"s{index % 20}", set_params({"top_k": index}))
                timings["change_session"].append(time.perf_counter() - started)
                started = time.perf_counter()
                await store.record_outcome(f"rec-{index}", f"req-{index}", "success")
                timings["record_outcome"].append(time.perf_counter() - started)
        finally:
            await store.close()
        return {k: statistics.median(v) * 1000 for k, v in timings.items()}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40, help="turns per client")
    parser.add_argument(
        "--stores", default="memory,ray,redis,cluster,sentinel", help="comma-separated"
    )
    args = parser.parse_args()
    rows = []
    with (
        RedisServer(durable=True) as redis,
        RedisClusterServers(masters=3, durable=True) as cluster,
        SentinelSet(replicas=1, sentinels=3, durable=True) as sentinel,
    ):
        urls = {"redis": redis.url, "cluster": cluster.url, "sentinel": sentinel.url}
        calls = {name: store_calls(url) for name, url in urls.items()}
        calls["sentinel, no WAIT"] = store_calls(sentinel.url + "?wait_replicas=0")
        for store in args.stores.split(","):
            env = {"CHATSTREAM_REDIS_URL": urls[store]} if store in urls else {}
            kind = "redis" if store in urls else store
            print(f"==> serve run with session_store={kind} ({store})", flush=True)
            with LocalServe({**ARGS, "session_store": kind}, env=env) as service:
                for concurrency in (1, 8):
                    ttfts = measure(service.url, concurrency, args.turns)
                    rows.append((store, concurrency, ttfts))
    print("\nstore calls, one client, p50 ms:")
    print(f"{'redis shape':<18} {'change_session':>15} {'record_outcome':>15}")
    for name, timing in calls.items():
        print(f"{name:<18} {timing['change_session']:>15.2f} {timing['record_outcome']:>15.2f}")
    base = {c: statistics.median(t) for s, c, t in rows if s == "memory"}
    print(f"\nload average: {os.getloadavg()[0]:.2f} (2-core machine)")
    print(f"{'store':<9} {'conc':>4} {'turns':>6} {'TTFT p50 ms':>12} {'p95 ms':>8} {'+p50 ms':>8}")
    for store, concurrency, ttfts in rows:
        p50 = statistics.median(ttfts)
        p95 = statistics.quantiles(ttfts, n=20)[18]
        added = (p50 - base[concurrency]) * 1000
        print(
            f"{store:<9} {concurrency:>4} {len(ttfts):>6} {p50 * 1000:>12.1f} "
            f"{p95 * 1000:>8.1f} {added:>+8.1f}"
        )


if __name__ == "__main__":
    main()
