"""What users get from `serve run serve_app:app`, against the bare model: one command, one table.

    .venv/bin/python benchmarks/bench_engine.py            # the whole table (about 15 minutes)
    .venv/bin/python benchmarks/bench_engine.py --quick    # concurrency 1 and 8, 2 rounds
    .venv/bin/python benchmarks/bench_engine.py --vllm     # vLLM's server vs engine=vllm vs the
                                                           # default (benchmarks/bench_vllm.py)

For each concurrency N the same prompts (the first N of a fixed list of long-answer questions,
rendered with the model's chat template exactly as the ingress renders a first turn) run as:

  (a) generate       bare `model.generate`, one static batch of N (greedy, left-padded), at the
                     engine's default precision, and again in float32 (the old default)
  (b) engine         N concurrent `TransformersEngine.stream` calls in this process
  (c) service        N concurrent `POST /chat_stream` to a plain `serve run serve_app:app` with
                     default settings: no arguments besides the port, and no environment
                     variables set by this script (the request body asks for greedy decoding
                     and the token count, as a client would)
  (c') tuned rows    the same service with the settings named in the row's label

(b) and (c) arrive staggered over one decode step of (a) at that concurrency (not all at once),
as users do; (a) gets its whole batch at once. Reported: time to first token p50/p95, aggregate
tokens/s (all tokens of a round over the round's wall time), per-stream tokens/s, and the CPU
the stack spends per streamed token: the Serve proxy + ingress (and the model replica, whose
CPU includes the model), read from the processes' CPU times (psutil) over the rounds; the
per-token cost of the stack alone is measured with the mock engine (no model work). Modes
alternate round by round, so that load from elsewhere on the machine hits them alike; `uptime`
is recorded with every phase. A table goes to stdout and everything to
`benchmarks/results/bench-<time>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model is a local file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cpu_share import CpuUse, ProcessTree  # noqa: E402
from cpu_share import summary as cpu_summary  # noqa: E402

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.chat_tokens import prompt_token_ids  # noqa: E402
from serve_app.engines.hf_loading import load_model  # noqa: E402
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)
from serve_app.model_contract import GenerationRequest  # noqa: E402

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


def run_generate(
    model: Any, tokenizer: Any, eos_ids: frozenset[int], prompts: list[str], max_new_tokens: int
) -> tuple:
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
    lengths = generated_lengths(out[:, width:], eos_ids)
    streams = [StreamTiming(start, clock.first, end, n) for n in lengths]
    return end - start, streams


# --- (b) the engine ---------------------------------------------------------------------------


async def staggered(offsets: list[float], one: Any, items: list[Any]) -> tuple:
    """Start `one(item)` for each item at its offset (seconds); (wall time, results)."""
    start = time.perf_counter()

    async def later(offset: float, item: Any) -> StreamTiming:
        await asyncio.sleep(offset)
        return await one(item)

    results = await asyncio.gather(*(later(o, i) for o, i in zip(offsets, items, strict=True)))
    return time.perf_counter() - start, list(results)


async def run_engine(
    engine: TransformersEngine,
    prompts: list[str],
    params: GenerationParams,
    offsets: list[float] | None = None,
) -> tuple:
    async def one(prompt: str) -> StreamTiming:
        timing = StreamTiming(time.perf_counter())
        async for chunk in engine.stream(GenerationRequest(prompt, params)):
            now = time.perf_counter()
            if chunk.text and timing.first is None:
                timing.first = now
            timing.last = now
            timing.tokens += chunk.num_tokens
        return timing

    return await staggered(offsets or [0.0] * len(prompts), one, prompts)


async def measure_cancellation(engine: TransformersEngine, prompts: list[str]) -> dict:
    """Cancel one of four streams mid-way: decode steps and ms until its slot is free."""
    params = GenerationParams(temperature=0.0, max_new_tokens=200)
    got = asyncio.Event()
    chunks = 0

    async def victim() -> None:
        nonlocal chunks
        async for _ in engine.stream(GenerationRequest(prompts[0], params)):
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
    async for _ in engine.stream(GenerationRequest(prompt, params)):
        pass


# --- (c) the service over HTTP ----------------------------------------------------------------


async def run_http(
    url: str,
    questions: list[str],
    max_new_tokens: int,
    tokenizer: Any,
    offsets: list[float] | None = None,
) -> tuple:
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
        # The HTTP stream carries text only: count tokens by re-tokenizing the answer
        # (None: the mock engine's "tokens" are words).
        answer = "".join(parts)
        timing.tokens = (
            len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            if tokenizer is not None
            else len(answer.split())
        )
        return timing

    return await staggered(offsets or [0.0] * len(questions), one, questions)


def start_service(args: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    """`serve run` with exactly `args` (and the port); `env` adds variables for tuned rows."""
    from serve_app.local_server import LocalServe

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        server = LocalServe(args, startup_timeout_s=600, log_path=RESULTS_DIR / "serve.log")
        server.__enter__()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return server


# --- driver -----------------------------------------------------------------------------------


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


@dataclass
class Service:
    label: str  # the row's mode name
    args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def run_rounds(
    levels: list[int],
    rounds: int,
    modes: dict[str, Any],
    step_s: dict[int, float],
    rounds_at: dict[int, int] | None = None,
) -> list[Row]:
    """`modes`: name -> fn(level, offsets) -> (wall, streams, cpu dict | None), alternated.
    `rounds_at`: more rounds at some levels (at 1 stream, 2 rounds are 2 TTFT samples)."""
    rows = []
    for level in levels:
        offsets = [i * step_s.get(level, 0.0) / level for i in range(level)]
        results: dict[str, list] = {m: [] for m in modes}
        cpus: dict[str, list] = {m: [] for m in modes}
        for _ in range(max(rounds, (rounds_at or {}).get(level, 0))):
            for name, fn in modes.items():
                wall, streams, cpu = fn(level, offsets)
                results[name].append((wall, streams))
                if cpu is not None:
                    cpus[name].append(cpu)
        for name in modes:
            row = summarize(name, level, results[name])
            if cpus[name]:
                used = sum(cpus[name], CpuUse(0.0))
                row.extra.update(cpu_summary(used, row.tokens))
                # Cores in use while the rounds ran: the model replica's (with engine=vllm,
                # vLLM's processes), and the rest of the machine's.
                model = sum(used.roles[r] for r in ("replica", "engine_core", "engine_worker"))
                row.extra["cores_replica"] = model / used.wall
                row.extra["cores_rest"] = (sum(used.cores) - model) / used.wall
            rows.append(row)
            print_progress(row)
    return rows


def http_mode(server: Any, questions: list[str], max_new_tokens: int, tokenizer: Any) -> Any:
    tree = ProcessTree(server._proc.pid)

    def fn(level: int, offsets: list[float]) -> tuple:
        before = tree.snapshot()
        qs = [questions[i % len(questions)] for i in range(level)]
        wall, streams = asyncio.run(run_http(server.url, qs, max_new_tokens, tokenizer, offsets))
        return wall, streams, tree.snapshot() - before

    return fn


def measure_stack(levels: list[int], rounds: int, max_new_tokens: int) -> list[Row]:
    """CPU per streamed token of proxy + ingress + replica with the mock engine (no model), and
    the latency the stack alone adds before a first token (the mock answers at once)."""
    server = start_service({"engine": "mock", "mock_mode": "long"})
    print(f"  stack (mock engine) ...  load: {uptime()}", flush=True)
    try:
        fn = http_mode(server, QUESTIONS, max_new_tokens, None)
        fn(2, [0.0, 0.0])  # warm-up
        return run_rounds(levels, rounds, {"stack (mock)": fn}, {})
    finally:
        server.__exit__(None, None, None)


def main() -> int:
    if "--vllm" in sys.argv[1:]:
        # The engine comparison of issue 19 (vLLM's own server, engine=vllm, the default).
        from bench_vllm import main as vllm_main

        return vllm_main([a for a in sys.argv[1:] if a != "--vllm"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and mode")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,8 and 2 rounds")
    parser.add_argument("--model", default="", help="model id/dir/.gguf; empty = embedded SmolLM2")
    parser.add_argument(
        "--tuned",
        default="dtype=float32;quantization=int8",
        help="';'-separated tuned services, each 'key=value,...' of serve args (and ENV=value "
        "for environment variables in capitals); '' for none",
    )
    parser.add_argument("--skip-stack", action="store_true", help="no mock-engine stack run")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.rounds = "1,8", 2
    levels = [int(c) for c in args.concurrency.split(",")]
    model_args = {"model": args.model} if args.model else {}

    started = uptime()
    print(f"load at start: {started}", flush=True)
    config = ChatStreamConfig(max_ongoing_requests=max(levels), **model_args)
    formatter = TransformersPromptFormatter(config)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(max(levels))]
    prompts = [formatter.render([ChatMessage("user", q)]) for q in questions]
    engine = TransformersEngine(config)
    asyncio.run(engine.start())
    eos = engine.scheduler.eos_ids
    params = GenerationParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    # The old default precision, float32, as the reference of the faster-path target. Loaded on
    # the engine's own thread like all torch work here: a second thread with torch operators
    # brings a second OpenMP team, and libgomp then stops spinning for both (slower steps).
    fp32 = asyncio.run(
        engine.run_on_model_thread(
            lambda: load_model(ChatStreamConfig(dtype="float32", **model_args))[0]
        )
    )
    device = str(next(engine.model.parameters()).device)
    print(
        f"model={args.model or 'embedded SmolLM2-135M-Instruct Q4_1 GGUF'} device={device} "
        f"default precision={engine.model.dtype} torch_threads={engine.num_threads} "
        f"max_new_tokens={args.max_new_tokens} rounds={args.rounds}",
        flush=True,
    )

    def generate_mode(model: Any) -> Any:
        def fn(level: int, offsets: list[float]) -> tuple:
            # On the engine's own thread: torch work on a second thread would slow both (see
            # BatchScheduler.call).
            wall, streams = asyncio.run(
                engine.run_on_model_thread(
                    lambda: run_generate(
                        model, engine.tokenizer, eos, prompts[:level], args.max_new_tokens
                    )
                )
            )
            step_s.setdefault(level, wall / args.max_new_tokens)
            return wall, streams, None

        return fn

    def engine_mode(level: int, offsets: list[float]) -> tuple:
        wall, streams = asyncio.run(run_engine(engine, prompts[:level], params, offsets))
        return wall, streams, None

    # Warm up every code path once (first calls allocate and pick kernels).
    step_s: dict[int, float] = {}
    for model in (engine.model, fp32):
        asyncio.run(
            engine.run_on_model_thread(
                lambda m=model: run_generate(m, engine.tokenizer, eos, prompts[:2], 4)
            )
        )
    asyncio.run(run_engine(engine, prompts[:2], GenerationParams(temperature=0, max_new_tokens=4)))
    # One round of (a) per level first: its step time staggers the arrivals of (b) and (c).
    for level in levels:
        generate_mode(engine.model)(level, [])

    services = [Service("(c) service", {})]
    for spec in filter(None, args.tuned.split(";")):
        pairs = dict(kv.split("=", 1) for kv in spec.split(","))
        env = {k: v for k, v in pairs.items() if k.isupper()}
        serve_args = {k: v for k, v in pairs.items() if not k.isupper()}
        services.append(Service(f"(c') {spec}", serve_args, env))

    rows: list[Row] = []
    loads = {"start": started}
    for index, service in enumerate(services):
        print(f"  starting {service.label} (serve run) ...", flush=True)
        server = start_service({**service.args, **model_args}, service.env)
        try:
            http = http_mode(server, questions, args.max_new_tokens, engine.tokenizer)
            http(2, [0.0, 0.0])  # warm-up
            loads[service.label] = uptime()
            print(f"  load: {loads[service.label]}", flush=True)
            # The references run beside the default service only; tuned rows compare with them.
            modes = {}
            if index == 0:
                modes["(a) generate"] = generate_mode(engine.model)
                modes["(a) generate fp32"] = generate_mode(fp32)
                modes["(b) engine"] = engine_mode
            modes[service.label] = http
            rows += run_rounds(levels, args.rounds, modes, step_s)
        finally:
            server.__exit__(None, None, None)
    cancellation = asyncio.run(measure_cancellation(engine, prompts))
    engine.shutdown()
    if not args.skip_stack:
        rows += measure_stack([1, 8], args.rounds, 256)
    loads["end"] = uptime()

    print()
    print_table(rows)
    print_footnote()
    print(
        f"\ncancelled stream left the batch after {cancellation.get('steps')} decode step(s), "
        f"{cancellation.get('ms', float('nan')):.1f} ms"
    )
    report_targets(rows)
    print("\nload (uptime) during the run:")
    for phase, load in loads.items():
        print(f"  {phase}: {load}")

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "environment": environment(engine, args),
                "load": loads,
                "rows": [asdict(r) for r in rows],
                "cancellation": cancellation,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


def print_progress(row: Row) -> None:
    print(
        f"  {row.mode:<28} conc={row.concurrency:<3} ttft p50 {row.ttft_p50_ms:7.1f} ms  "
        f"agg {row.aggregate_tok_s:7.1f} tok/s",
        flush=True,
    )


def print_table(rows: list[Row]) -> None:
    """Markdown, ready for the README."""
    base = {r.concurrency: r for r in rows if r.mode == "(a) generate"}
    base32 = {r.concurrency: r for r in rows if r.mode == "(a) generate fp32"}
    print(
        "| mode | conc | TTFT p50 | TTFT p95 | agg tok/s | per-stream tok/s | agg / (a)* "
        "| TTFT p50 / (a)* | stack CPU ms/token (proxy+ingress) | replica CPU ms/token "
        "| cores busy: replica + rest |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        # Each row against the bare model at its own precision.
        ref = (base32 if "float32" in row.mode else base).get(row.concurrency)
        mock = row.mode.startswith("stack")
        ratio = f"{row.aggregate_tok_s / ref.aggregate_tok_s:.2f}" if ref and not mock else "—"
        ttft = f"{row.ttft_p50_ms / ref.ttft_p50_ms:.2f}" if ref and not mock else "—"
        stack = replica = cores = "—"
        if "cpu_ms_proxy" in row.extra:
            e = row.extra
            stack = f"{e['cpu_ms_proxy'] + e['cpu_ms_ingress']:.2f}"
            replica = f"{e['cpu_ms_replica']:.2f}"
            cores = f"{e['cores_replica']:.2f} + {e['cores_rest']:.2f}"
        print(
            f"| {row.mode} | {row.concurrency} | {row.ttft_p50_ms:.1f} ms | "
            f"{row.ttft_p95_ms:.1f} ms | {row.aggregate_tok_s:.1f} | {row.per_stream_tok_s:.1f} "
            f"| {ratio} | {ttft} | {stack} | {replica} | {cores} |"
        )


def print_footnote() -> None:
    print(
        "\n(a)* = (a) generate at the same precision and concurrency (float32 rows: (a) "
        "generate fp32). Stack CPU: proxy + ingress; the replica's CPU includes the model "
        "(with the mock engine: only the replica's own streaming). Cores busy: the model "
        "replica's CPU and the rest of the machine's (proxy, ingress, the benchmark's client, "
        "Ray's processes) per second of the rounds; (a) and (b) compute on every core. The "
        "stack rows' TTFT at concurrency 1 is the latency the stack adds (the mock answers "
        "at once)."
    )


def report_targets(rows: list[Row]) -> None:
    get = {(r.mode, r.concurrency): r for r in rows}
    a8, a8_32, c8 = (get.get((m, 8)) for m in ("(a) generate", "(a) generate fp32", "(c) service"))
    a1, c1 = get.get(("(a) generate", 1)), get.get(("(c) service", 1))

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print()
    if a8 and c8:
        ratio = c8.aggregate_tok_s / a8.aggregate_tok_s
        print(f"target (c) agg at 8 >= 0.9 x (a) batch 8: {ratio:.2f} x -> {verdict(ratio >= 0.9)}")
        ttft = c8.ttft_p50_ms / a8.ttft_p50_ms
        print(f"target (c) TTFT p50 at 8 <= 1.3 x (a): {ttft:.2f} x -> {verdict(ttft <= 1.3)}")
    if a1 and c1:
        added = c1.ttft_p50_ms - a1.ttft_p50_ms
        print(f"target TTFT added at conc 1 <= 15 ms: {added:+.1f} ms -> {verdict(added <= 15)}")
        stack1 = get.get(("stack (mock)", 1))
        if stack1:
            print(f"  of which the stack alone (mock engine, conc 1): {stack1.ttft_p50_ms:.1f} ms")
    if a8_32 and c8:
        ratio = c8.aggregate_tok_s / a8_32.aggregate_tok_s
        print(
            f"target (c) agg at 8 >= 1.5 x fp32 (a) batch 8: {ratio:.2f} x -> "
            f"{verdict(ratio >= 1.5)}"
        )


def environment(engine: TransformersEngine, args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {
        "args": vars(args),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": engine.num_threads,
        "cpu_count": os.cpu_count(),
        "device": str(next(engine.model.parameters()).device),
        "dtype": str(engine.model.dtype),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())
