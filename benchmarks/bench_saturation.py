"""Where session affinity should give up: the queue length at which a turn waiting on its own
(busy) replica gets its first token later than it would prefilling its whole history on an
idle one. That is the router's `SATURATION_QUEUE_LEN` (serve_app/session_router.py).

One model replica of the default engine as `serve run ... num_replicas=R` places it on this
machine: torch threads = usable cores / R (a 2-core box, 2 replicas: 1 thread each). On it:

- `q` background streams decode (no session; prompts of `--background-tokens`, never ending
  before the run does), for each q of `--queues`;
- a probe turn then asks for one token, `--probes` times at each q:
  - *affine*: a session whose `--history` tokens are kept on this replica; the turn adds
    `--new-tokens` and prefills only those;
  - *elsewhere*: the same prompt without a session, a full prefill of history + new tokens
    (what the fallback replica does; at q = 0 an idle one).

Prints TTFT p50 per q for both and the router's two bounds: the q at which the affine TTFT
passes the elsewhere TTFT at q = 0 (a full prefill on an idle replica: `SATURATION_QUEUE_LEN`),
from the table and from a linear fit; and the ratio of the two TTFT slopes per queued request
(`FALLBACK_COST_RATIO`: what a request queued on the fallback replica costs the fallback turn,
in requests queued on the affine one).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_saturation.py \\
        [--replicas 2] [--history 1500] [--queues 0,4,8,16,24,32] [--probes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.threads import usable_cores  # noqa: E402
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)
from serve_app.model_contract import GenerationRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_affinity import user_turn  # noqa: E402

PROCESS = psutil.Process()
FOREVER = GenerationParams(temperature=0.0, max_new_tokens=4096)
# Two tokens: a turn whose answer ends at its first token never joins the decoding batch, and
# only rows that leave the batch keep their KV for the session.
PROBE = GenerationParams(temperature=0.0, max_new_tokens=2)


def worker_cpu_s(engine: TransformersEngine) -> float:
    """CPU seconds the engine's worker thread has run (its one torch thread computes there)."""
    native = engine._thread.native_id
    return next(t.user_time + t.system_time for t in PROCESS.threads() if t.id == native)


async def first_token_s(
    engine: TransformersEngine, prompt: list[int], session=None
) -> tuple[float, float]:
    """(wall, worker CPU) seconds to the first answer chunk; the rest of the answer is read.

    On a busy shared machine the wall time includes waiting for a core; the worker's CPU time
    is what a replica with its own core would take (the two agree on a quiet machine)."""
    start, cpu = time.perf_counter(), worker_cpu_s(engine)
    first = None
    async for _ in engine.stream(GenerationRequest(prompt, PROBE, session=session)):
        if first is None:
            first = (time.perf_counter() - start, worker_cpu_s(engine) - cpu)
    return first


async def background(engine: TransformersEngine, prompt: list[int], started: asyncio.Event):
    """A stream that decodes until cancelled; `started` is set at its first token."""
    request = GenerationRequest(prompt, FOREVER, ignore_eos=True)
    async for _ in engine.stream(request):
        started.set()


def fit_slope(xs: list[float], ys: list[float]) -> float:
    return statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0


async def measure(args: argparse.Namespace) -> None:
    threads = max(1, usable_cores() // args.replicas)
    queues = sorted(int(q) for q in args.queues.split(","))
    config = ChatStreamConfig(torch_threads=threads, max_ongoing_requests=max(queues) + 2)
    engine = TransformersEngine(config)
    await engine.start()
    formatter = TransformersPromptFormatter(config)

    history = [ChatMessage("user", user_turn(0, 0, args.history))]
    history_ids = formatter.model_input(history)

    def probe(i: int) -> list[int]:
        new = user_turn(1, i, args.new_tokens)
        return formatter.model_input([*history, ChatMessage("assistant", "Noted."),
                                      ChatMessage("user", new)])  # fmt: skip

    # The session's history is kept on this replica (its first turn), and the engine is warm.
    await first_token_s(engine, history_ids, session="probe")
    await first_token_s(engine, probe(-1))
    print(
        f"model replica: {config.dtype} dtype, {threads} torch thread(s) "
        f"({usable_cores()} cores / {args.replicas} replicas); history {len(history_ids)} tokens, "
        f"a turn adds {len(probe(0)) - len(history_ids)}; background prompts "
        f"{args.background_tokens} tokens",
        flush=True,
    )

    streams: list[asyncio.Task] = []
    rows = []
    walls: dict[int, tuple[float, float]] = {}
    n = 0
    try:
        for q in queues:
            while len(streams) < q:
                started = asyncio.Event()
                prompt = formatter.model_input(
                    [ChatMessage("user", user_turn(100 + len(streams), 0, args.background_tokens))]
                )
                streams.append(asyncio.create_task(background(engine, prompt, started)))
                await asyncio.wait_for(started.wait(), 600)
            affine, elsewhere = [], []
            for _ in range(args.probes):
                n += 1
                affine.append(await first_token_s(engine, probe(n), session="probe"))
                elsewhere.append(await first_token_s(engine, probe(n)))
            walls[q] = (statistics.median(w for w, _ in affine),
                        statistics.median(w for w, _ in elsewhere))  # fmt: skip
            rows.append((q, statistics.median(c for _, c in affine),
                         statistics.median(c for _, c in elsewhere)))  # fmt: skip
            print(
                f"q={q}: affine {rows[-1][1]:.3f} s CPU ({walls[q][0]:.3f} s wall), elsewhere "
                f"{rows[-1][2]:.3f} s CPU ({walls[q][1]:.3f} s wall)",
                flush=True,
            )
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        engine.shutdown()
    print(f"\nwall-clock TTFT p50 (s), affine / elsewhere: {walls}")
    report(rows, len(history_ids))


def report(rows: list[tuple[int, float, float]], history_tokens: int) -> None:
    print("\nTTFT p50 in the replica worker's CPU seconds (= wall seconds on its own core):")
    print("\n| queued requests on the replica | TTFT affine (s) | TTFT elsewhere (s) |")
    print("|---|---|---|")
    for q, affine, elsewhere in rows:
        print(f"| {q} | {affine:.3f} | {elsewhere:.3f} |")
    if len(rows) < 2 or rows[0][0] != 0:
        print("(needs q = 0 and one more q for the bounds)")
        return
    queues = [q for q, _, _ in rows]
    per_request = fit_slope(queues, [a for _, a, _ in rows])
    per_request_elsewhere = fit_slope(queues, [e for _, _, e in rows])
    idle = rows[0][2]
    per_token = (idle - rows[0][1]) / history_tokens
    print(
        f"\nms per queued request: affine {per_request * 1000:.0f}, elsewhere "
        f"{per_request_elsewhere * 1000:.0f}; ms per history token prefilled (idle): "
        f"{per_token * 1000:.2f}"
    )
    measured = next((q for q, a, _ in rows if a > idle), None)
    fitted = (idle - rows[0][1]) / per_request if per_request > 0 else float("inf")
    ratio = per_request_elsewhere / per_request if per_request > 0 else float("inf")
    print(
        "affine TTFT passes a full prefill on an idle replica at q = "
        + (str(measured) if measured is not None else f"> {rows[-1][0]} (not reached)")
        + f" (table), {fitted:.1f} (linear fit)\n"
        f"each request queued on the other replica costs the fallback {ratio:.1f} x what it "
        "costs the affine turn\n"
        f"=> SATURATION_QUEUE_LEN = {math.ceil(fitted)}, FALLBACK_COST_RATIO = {ratio:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--history", type=int, default=1500, help="tokens kept (about)")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--background-tokens", type=int, default=800)
    parser.add_argument("--queues", default="0,4,8,16,24,32")
    parser.add_argument("--probes", type=int, default=3)
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
