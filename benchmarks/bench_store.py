"""What the state store costs a user: time to first token through `serve run` with the mock
engine, per store (memory, ray, redis), at concurrency 1 and 8. One run, one machine.

    .venv/bin/python -m benchmarks.bench_store [--turns 40]

Each client has its own session and sends its turns one after another (so every turn takes
and releases the session's turn, and saves its answer). The Redis store runs against a local
Debian redis-server started by the script on a free loopback port (durable: append-only file,
fsync every write, as the chart's Redis would). Prints one table; the figures depend on the
machine and on what else runs on it (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import httpx

from serve_app.local_server import LocalServe
from tests.redis_server import RedisServer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40, help="turns per client")
    args = parser.parse_args()
    rows = []
    with RedisServer(durable=True) as redis:
        for store in ("memory", "ray", "redis"):
            env = {"CHATSTREAM_REDIS_URL": redis.url} if store == "redis" else {}
            print(f"==> serve run with session_store={store}", flush=True)
            with LocalServe({**ARGS, "session_store": store}, env=env) as service:
                for concurrency in (1, 8):
                    ttfts = measure(service.url, concurrency, args.turns)
                    rows.append((store, concurrency, ttfts))
    base = {c: statistics.median(t) for s, c, t in rows if s == "memory"}
    print(f"\nload average: {os.getloadavg()[0]:.2f} (2-core machine)")
    print(f"{'store':<8} {'conc':>4} {'turns':>6} {'TTFT p50 ms':>12} {'p95 ms':>8} {'+p50 ms':>8}")
    for store, concurrency, ttfts in rows:
        p50 = statistics.median(ttfts)
        p95 = statistics.quantiles(ttfts, n=20)[18]
        added = (p50 - base[concurrency]) * 1000
        print(
            f"{store:<8} {concurrency:>4} {len(ttfts):>6} {p50 * 1000:>12.1f} "
            f"{p95 * 1000:>8.1f} {added:>+8.1f}"
        )


if __name__ == "__main__":
    main()
