"""Issue 22's flood, as a plain asyncio client: one key keeps `flood_loops` streaming requests
going (each sends again the moment its answer ends, after a short pause on a refusal), and once
the service is full a polite key sends `polite_requests` requests one after another.

Used by the end-to-end fairness test (tests/test_fair_queue_flood.py) and the throughput
benchmark (benchmarks/bench_tenants.py); Locust's `tenants` profile is the long-running form.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

# The set-up: one ingress replica, 8 slots, 8 queue places; 96 tokens at 0.05 s each
# make an answer 4.8 s, so one of the 8 slots frees about every 0.6 s.
FLOOD_SERVICE_ARGS = {
    "engine": "mock",
    "mock_mode": "long",
    "mock_time_per_token_sec": 0.05,
    "max_new_tokens": 96,
    "ingress_replicas": 1,
    "num_replicas": 1,
    "max_ongoing_requests": 8,
    "max_queued_requests": 8,
}
FLOOD_KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
KEYS_ENV_VALUE = "\n".join(f"{key_id}:{key}" for key_id, key in FLOOD_KEYS.items())
REFUSAL_PAUSE_S = 0.05  # a flooder's pause after a 429: keeps the client's CPU sane


@dataclass
class TenantTally:
    """What one key got: answers read to the end, refusals by status and code, first chunks."""

    answers: int = 0
    tokens: int = 0  # content chunks of the answers read to the end (one per word: mock)
    refused: Counter = field(default_factory=Counter)
    first_chunk_s: list[float] = field(default_factory=list)

    @property
    def admitted(self) -> int:
        return len(self.first_chunk_s)


@dataclass
class FloodResult:
    flood: TenantTally
    polite: TenantTally
    window_s: float  # from the polite key's first request to the end of the run
    window_answers: int  # answers (both keys) that ended inside the window
    window_tokens: int


def _error_code(body: bytes, status: int) -> str:
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("code") or error.get("type") or status)
    except (ValueError, AttributeError):
        return str(status)


async def _one_request(
    client: httpx.AsyncClient, key: str, tally: TenantTally, ends: list[tuple[float, int]]
) -> bool:
    """One streamed chat completion; True if admitted and read to the end."""
    started = time.monotonic()
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            tally.refused[
                f"{resp.status_code} {_error_code(await resp.aread(), resp.status_code)}"
            ] += 1
            return False
        tokens = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                if tokens == 0:
                    tally.first_chunk_s.append(time.monotonic() - started)
                tokens += 1
    tally.answers += 1
    tally.tokens += tokens
    ends.append((time.monotonic(), tokens))
    return True


async def run_flood(
    url: str,
    flood_key: str = FLOOD_KEYS["alice"],
    polite_key: str = FLOOD_KEYS["bob"],
    *,
    flood_loops: int = 40,
    polite_requests: int = 6,
    ramp_s: float = 5.0,
    warmup_s: float = 8.0,
    min_window_s: float = 0.0,
    answer_timeout_s: float = 120.0,
) -> FloodResult:
    """The flood for `warmup_s`, then the polite key's requests one after another; the run ends
    when they are done and at least `min_window_s` has passed since the first of them. The
    flood's loops start spread over `ramp_s` (as Locust's spawn rate spreads users): started
    all at once, every answer would end in the same instant and slots would free in bursts of
    8 every answer's time, not one every ~0.6 s."""
    flood, polite = TenantTally(), TenantTally()
    ends: list[tuple[float, int]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=flood_loops + 8, max_keepalive_connections=flood_loops)
    timeout = httpx.Timeout(answer_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def flood_loop(delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            while not stop.is_set():
                try:
                    if not await _one_request(client, flood_key, flood, ends):
                        await asyncio.sleep(REFUSAL_PAUSE_S)
                except httpx.HTTPError as exc:
                    flood.refused[type(exc).__name__] += 1
                    await asyncio.sleep(REFUSAL_PAUSE_S)

        loops = [
            asyncio.create_task(flood_loop(i * ramp_s / flood_loops)) for i in range(flood_loops)
        ]
        try:
            await asyncio.sleep(warmup_s)
            window_start = time.monotonic()
            for _ in range(polite_requests):
                await _one_request(client, polite_key, polite, ends)
            await asyncio.sleep(max(0.0, window_start + min_window_s - time.monotonic()))
            window_end = time.monotonic()
        finally:
            stop.set()
            for loop in loops:
                loop.cancel()  # answers cut here are the client leaving: not counted
            await asyncio.gather(*loops, return_exceptions=True)
    inside = [tokens for at, tokens in ends if window_start <= at <= window_end]
    return FloodResult(flood, polite, window_end - window_start, len(inside), sum(inside))
