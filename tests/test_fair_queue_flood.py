"""Issue 22's flood end to end, through `serve run` with the mock engine: one ingress replica,
8 slots, 8 queue places, a slot freed about every 0.6 s; alice keeps 40 requests going, then
bob sends 6 one after another. Before the fair queue all 6 of bob's got 429. Time to first
chunk is reported by benchmarks/bench_tenants.py, not asserted here."""

from __future__ import annotations

import asyncio

from loadtest.flood import FLOOD_SERVICE_ARGS, KEYS_ENV_VALUE, run_flood
from serve_app.api_keys import API_KEYS_ENV
from serve_app.local_server import LocalServe


def test_under_alices_40_loop_flood_all_6_of_bobs_sequential_requests_are_admitted():
    with LocalServe(FLOOD_SERVICE_ARGS, env={API_KEYS_ENV: KEYS_ENV_VALUE}) as server:
        # Each of bob's waits for at most 2 freed slots (~1.2 s) and streams for ~4.8 s: the
        # bound leaves room for a machine many times slower than that.
        result = asyncio.run(asyncio.wait_for(run_flood(server.url), timeout=300))
    assert result.polite.refused == {}, result.polite.refused
    assert result.polite.answers == 6 and result.polite.admitted == 6
    # The service was full: the flood was refused for its share, and still got answers.
    assert result.flood.answers > 0
    assert sum(n for code, n in result.flood.refused.items() if code.startswith("429")) > 0
