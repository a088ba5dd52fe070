"""Throughput and time-to-first-token of the transformers engine, against the bare model.

    .venv/bin/python benchmarks/bench_engine.py                # all three modes, CPU or CUDA
    .venv/bin/python benchmarks/bench_engine.py --modes generate,engine --concurrency 1,8

For each concurrency the same prompts (the first N of a fixed list of long-answer questions,
rendered with the model's chat template exactly as the ingress renders a first turn) run as:

  generate  (a) bare `model.generate`, one static batch of N (greedy, left-padded)
  engine    (b) N concurrent `TransformersEngine.stream` calls in this process
  http      (c) N concurrent `POST /chat_stream` on a local Ray Serve (`LocalServe`)

and it reports time to first token p50/p95, aggregate tokens/s (all tokens of a round over the
round's wall time) and per-stream tokens/s (each stream's tokens after the first over the time
from its first to its last token), with the ratios of (b) and (c) to (a). It also measures how
many decode steps a cancelled stream stays in the batch. A table goes to stdout and everything
to `benchmarks/results/bench-<time>.json`. Timings, so keep the machine otherwise quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model is a local file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.batching import prompt_token_ids  # noqa: E402
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how airplanes stay in the air.",
    "Describe the history of the Roman Empire.",
    "Write a long poem about autumn in the mountains.",
    "Explain photosynthesis step by step.",
    "Tell me about each planet of the solar system.",
    "Write an essay about friendship.",
    "Describe a day in the life of a Tokyo taxi driver.",
    "Explain how a computer compiles a program.",
    "Write a letter to a friend about a trip to Italy.",
    "Describe how bread is made, from wheat to loaf.",
    "Explain the rules of chess to a beginner.",
    "Write a story about a robot who wants to paint.",
    "Describe the water cycle in detail.",
    "Explain why the sky is blue and sunsets are red.",
    "Write a long description of a medieval market.",
]


@dataclass
class StreamTiming:
    start: float
    first: float | None = None  # first token (first non-empty chunk)
    last: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.last or self.start) - self.start

    @property
    def rate(self) -> float | None:
        if self.first is None or self.last is None or self.last <= self.first or self.tokens < 2:
            return None
        return (self.tokens - 1) / (self.last - self.first)


@dataclass
class Row:
    mode: str
    concurrency: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    aggregate_tok_s: float
    per_stream_tok_s: float
    tokens: int
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(mode: str, concurrency: int, rounds: list[tuple[float, list[StreamTiming]]]) -> Row:
    """`rounds`: (wall seconds, the streams of that round)."""
    streams = [s for _, round_streams in rounds for s in round_streams]
    ttfts = [s.ttft * 1000 for s in streams]
    aggregates = [sum(s.tokens for s in ss) / wall for wall, ss in rounds]
    rates = [r for r in (s.rate for s in streams) if r is not None]
    return Row(
        mode=mode,
        concurrency=concurrency,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p95_ms=percentile(ttfts, 95),
        aggregate_tok_s=statistics.median(aggregates),
        per_stream_tok_s=statistics.mean(rates) if rates else 0.0,
        tokens=sum(s.tokens for s in streams),
        rounds=len(rounds),
    )


# --- (a) bare model.generate ------------------------------------------------------------------


class _FirstTokenClock:
    """A `generate` streamer that only notes when the first new tokens come out."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def generated_lengths(new_tokens: torch.Tensor, eos_ids: frozenset[int]) -> list[int]:
    """Tokens per row before the first EOS (what a stream would have sent)."""
    lengths = []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        lengths.append(cut)
    return lengths


def run_generate(engine: TransformersEngine, prompts: list[str], max_new_tokens: int) -> tuple:
    model, tokenizer = engine.model, engine.tokenizer
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = [prompt_token_ids(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    device = next(model.parameters()).device
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=clock,
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    lengths = generated_lengths(out[:, width:], engine.scheduler.eos_ids)
    streams = [StreamTiming(start, clock.first, end, n) for n in lengths]
    return end - start, streams


# --- (b) the engine ---------------------------------------------------------------------------


async def run_engine(
    engine: TransformersEngine, prompts: list[str], params: GenerationParams
) -> tuple:
    async def one(prompt: str) -> StreamTiming:
        timing = StreamTiming(time.perf_counter())
        async for chunk in engine.stream(prompt, params):
            now = time.perf_counter()
            if chunk.text and timing.first is None:
                timing.first = now
            timing.last = now
            timing.tokens += chunk.num_tokens
        return timing

    start = time.perf_counter()
    streams = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, list(streams)


async def measure_cancellation(engine: TransformersEngine, prompts: list[str]) -> dict:
    """Cancel one of four streams mid-way: decode steps and ms until its slot is free."""
    params = GenerationParams(temperature=0.0, max_new_tokens=200)
    got = asyncio.Event()
    chunks = 0

    async def victim() -> None:
        nonlocal chunks
        async for _ in engine.stream(prompts[0], params):
            chunks += 1
            if chunks >= 5:
                got.set()

    others = [asyncio.create_task(_drain(engine, p, params)) for p in prompts[1:4]]
    task = asyncio.create_task(victim())
    await got.wait()
    before = engine.running
    steps, start = engine.scheduler.steps, time.perf_counter()
    task.cancel()
    while engine.running >= before:
        await asyncio.sleep(0.0005)
    reason, left_at_step = engine.scheduler.last_finished
    freed = {
        "reason": reason,
        "steps": left_at_step - steps,
        "ms": (time.perf_counter() - start) * 1000,
    }
    for other in others:
        other.cancel()
    await asyncio.gather(task, *others, return_exceptions=True)
    return freed


async def _drain(engine: TransformersEngine, prompt: str, params: GenerationParams) -> None:
    async for _ in engine.stream(prompt, params):
        pass


# --- (c) the service over HTTP ----------------------------------------------------------------


async def run_http(url: str, questions: list[str], max_new_tokens: int, tokenizer: Any) -> tuple:
    import httpx

    body = {"temperature": 0.0, "max_new_tokens": max_new_tokens}

    async def one(question: str) -> StreamTiming:
        # A client per stream: each is a new session, so the prompt is a first turn.
        async with httpx.AsyncClient(timeout=600) as client:
            timing = StreamTiming(time.perf_counter())
            parts = []
            async with client.stream(
                "POST", url + "/chat_stream", json={"user_input": question, **body}
            ) as response:
                response.raise_for_status()
                async for text in response.aiter_text():
                    now = time.perf_counter()
                    if text and timing.first is None:
                        timing.first = now
                    timing.last = now
                    parts.append(text)
        # The HTTP stream carries text only: count tokens by re-tokenizing the answer.
        timing.tokens = len(tokenizer("".join(parts), add_special_tokens=False)["input_ids"])
        return timing

    start = time.perf_counter()
    streams = await asyncio.gather(*(one(q) for q in questions))
    return time.perf_counter() - start, list(streams)


# --- driver -----------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    base = {r.concurrency: r for r in rows if r.mode == "generate"}
    header = (
        f"{'mode':<9} {'conc':>4} {'TTFT p50':>9} {'TTFT p95':>9} {'agg tok/s':>10} "
        f"{'stream tok/s':>12} {'agg/(a)':>8} {'+TTFT p50':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = base.get(row.concurrency)
        ratio = f"{row.aggregate_tok_s / ref.aggregate_tok_s:8.2f}" if ref else f"{'':>8}"
        added = f"{row.ttft_p50_ms - ref.ttft_p50_ms:+9.1f}ms" if ref else f"{'':>11}"
        print(
            f"{row.mode:<9} {row.concurrency:>4} {row.ttft_p50_ms:7.1f}ms {row.ttft_p95_ms:7.1f}ms "
            f"{row.aggregate_tok_s:10.1f} {row.per_stream_tok_s:12.1f} {ratio} {added}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--modes", default="generate,engine,http")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and mode")
    parser.add_argument("--model", default="", help="model id/dir/.gguf; empty = embedded SmolLM2")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"generate", "engine", "http"}:
        parser.error(f"unknown mode in {args.modes!r}")
    if max(levels) > len(QUESTIONS):
        parser.error(f"at most {len(QUESTIONS)} concurrent streams")
    max_batch = max(levels)
    config = ChatStreamConfig(model=args.model, device=args.device, max_ongoing_requests=max_batch)
    formatter = TransformersPromptFormatter(config)
    prompts = [formatter.render([ChatMessage("user", q)]) for q in QUESTIONS]
    engine = TransformersEngine(config)
    asyncio.run(engine.start())
    params = GenerationParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    device = str(next(engine.model.parameters()).device)
    print(
        f"model={args.model or 'embedded SmolLM2-135M-Instruct Q4_1 GGUF'} device={device} "
        f"dtype={engine.model.dtype} torch_threads={torch.get_num_threads()} "
        f"max_new_tokens={args.max_new_tokens} rounds={args.rounds}",
        flush=True,
    )

    # Warm up every code path once (first calls allocate and pick kernels).
    asyncio.run(engine.run_on_model_thread(lambda: run_generate(engine, prompts[:2], 4)))
    asyncio.run(run_engine(engine, prompts[:2], GenerationParams(temperature=0, max_new_tokens=4)))

    # Modes alternate round by round, so that load from elsewhere on the machine hits them alike.
    server = start_service(args, levels) if "http" in modes else contextlib.nullcontext()
    rows: list[Row] = []
    with server:
        if "http" in modes:
            asyncio.run(run_http(server.url, QUESTIONS[:2], 4, engine.tokenizer))  # warm-up
        for level in levels:
            rounds: dict[str, list] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    rounds[mode].append(run_round(mode, level, engine, prompts, params, server))
            for mode in modes:
                rows.append(summarize(mode, level, rounds[mode]))
                print_progress(rows[-1])
    cancellation = asyncio.run(measure_cancellation(engine, prompts))
    step_s = decode_step_seconds(engine, prompts[:8], args.max_new_tokens)
    engine.shutdown()

    order = {"generate": 0, "engine": 1, "http": 2}
    rows.sort(key=lambda r: (order[r.mode], r.concurrency))
    print()
    print_table(rows)
    print(
        f"\ncancelled stream left the batch after {cancellation.get('steps')} decode step(s), "
        f"{cancellation.get('ms', float('nan')):.1f} ms; a batch-8 decode step takes "
        f"{step_s * 1000:.1f} ms"
    )
    report_targets(rows)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "environment": environment(engine, args),
                "rows": [asdict(r) for r in rows],
                "cancellation": cancellation,
                "decode_step_batch8_ms": step_s * 1000,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


def print_progress(row: Row) -> None:
    print(
        f"  {row.mode:<8} conc={row.concurrency:<3} ttft p50 {row.ttft_p50_ms:7.1f} ms  "
        f"agg {row.aggregate_tok_s:7.1f} tok/s",
        flush=True,
    )


def decode_step_seconds(engine: TransformersEngine, prompts: list[str], tokens: int) -> float:
    """Mean wall time of one decode step with a batch of len(prompts) (from the engine)."""
    params = GenerationParams(temperature=0.0, max_new_tokens=tokens)
    steps = engine.scheduler.steps
    wall, _ = asyncio.run(run_engine(engine, prompts, params))
    return wall / max(1, engine.scheduler.steps - steps)


def start_service(args: argparse.Namespace, levels: list[int]) -> Any:
    from serve_app.local_server import LocalServe

    # Ray gives an actor OMP_NUM_THREADS = its num_cpus (1 by default) unless the variable is
    # already set; pass ours on so the replica computes with as many threads as (a) and (b).
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # Ray runs its workers at niceness 15 (RAY_worker_niceness) so its control processes stay
    # responsive; on a shared box that lets every other process, this benchmark's HTTP client
    # included, take the model replica's CPU. A k8s pod has its cores to itself; mimic that.
    os.environ.setdefault("RAY_worker_niceness", "0")
    serve_args = {
        "engine": "transformers",
        "model": args.model,
        "device": args.device,
        "max_ongoing_requests": max(levels),
        "max_queued_requests": 64,
        "session_store": "memory",
        "stream_interval_ms": args.stream_interval_ms,
        "temperature": 0.0,
        "max_new_tokens": args.max_new_tokens,
    }
    print("  starting the service (serve run) ...", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return LocalServe(serve_args, startup_timeout_s=600, log_path=RESULTS_DIR / "serve.log")


def run_round(
    mode: str,
    level: int,
    engine: TransformersEngine,
    prompts: list[str],
    params: GenerationParams,
    server: Any,
) -> tuple[float, list[StreamTiming]]:
    if mode == "generate":
        # On the engine's own thread: torch work on a second thread would slow both (see
        # BatchScheduler.call), making (a) and (b) look worse than they are.
        return asyncio.run(
            engine.run_on_model_thread(
                lambda: run_generate(engine, prompts[:level], params.max_new_tokens)
            )
        )
    if mode == "engine":
        return asyncio.run(run_engine(engine, prompts[:level], params))
    if mode == "http":
        return asyncio.run(
            run_http(server.url, QUESTIONS[:level], params.max_new_tokens, engine.tokenizer)
        )
    raise ValueError(f"unknown mode {mode!r}")


def report_targets(rows: list[Row]) -> None:
    get = {(r.mode, r.concurrency): r for r in rows}
    base8, http8 = get.get(("generate", 8)), get.get(("http", 8))
    if base8 and http8:
        ratio = http8.aggregate_tok_s / base8.aggregate_tok_s
        verdict = "met" if ratio >= 0.8 else "MISSED"
        print(f"target (c) conc 8 >= 0.8 x (a) batch 8: {ratio:.2f} x -> {verdict}")
    base1, http1 = get.get(("generate", 1)), get.get(("http", 1))
    if base1 and http1:
        added = http1.ttft_p50_ms - base1.ttft_p50_ms
        verdict = "met" if added <= 20 else "MISSED"
        print(f"target added TTFT p50 at conc 1 <= 20 ms: {added:+.1f} ms -> {verdict}")


def environment(engine: TransformersEngine, args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {
        "args": vars(args),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(next(engine.model.parameters()).device),
        "dtype": str(engine.model.dtype),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())
