"""engine=vllm against vLLM's own OpenAI server on the same weights, and the default engine: one
command, one table (the engine comparison of issue 19; `bench_engine.py --vllm` runs this).

    .venv/bin/python benchmarks/bench_vllm.py                 # 1, 8, 16, 32 streams, 2 rounds
    .venv/bin/python benchmarks/bench_vllm.py --quick         # 1 and 8, 1 round

Rows, each server started alone (the machine has 2 cores; they never run side by side):

  vllm server         `python -m vllm.entrypoints.openai.api_server --model DIR --enforce-eager`
                      (DIR: the embedded SmolLM2 converted as engine=vllm converts it), streamed
                      from /v1/chat/completions: the peer a user would deploy instead
  vllm /chat_stream   `serve run serve_app:app engine=vllm`, POST /chat_stream
  vllm /v1            the same service, streamed from /v1/chat/completions
  transformers        `serve run serve_app:app` (the default engine), POST /chat_stream

Greedy, the same fixed long-answer questions, `--max-new-tokens` each, all N clients at once.
Aggregate tok/s (tokens of a round over its wall time, median of rounds), TTFT p50/p95 (at 1
stream from `--ttft-samples` requests, one at a time), and
each process's CPU ms per streamed token by role, each core's load and the cores the rest of
the machine took (cpu_share.py). `--rows` picks servers; `--tuned` adds labelled engine=vllm
rows with other settings (`RAY_SERVE_THROUGHPUT_OPTIMIZED=0` is the default before
chatstream_defaults.RAY_SERVE_ENV); `--pin-experiment` a row with the stack moved off vLLM's
compute core.
Needs vLLM (`bash scripts/setup.sh --vllm`). Results: stdout and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine as be  # noqa: E402
from cpu_share import FRONT_END, ProcessTree, format_split, role_of  # noqa: E402

from serve_app.config import ChatStreamConfig  # noqa: E402
from serve_app.engines.vllm_weights import vllm_model_dir  # noqa: E402
from serve_app.local_server import free_port  # noqa: E402

SERVED_NAME = "SmolLM2-135M-Instruct"  # the service's /v1 model name for the embedded model


async def run_v1(url: str, model: str, questions: list[str], max_tokens: int) -> tuple:
    """N concurrent streamed /v1/chat/completions; tokens from the final usage chunk."""
    import httpx

    async def one(question: str) -> be.StreamTiming:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with httpx.AsyncClient(timeout=600) as client:
            timing = be.StreamTiming(time.perf_counter())
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    now = time.perf_counter()
                    if event.get("usage"):
                        timing.tokens = event["usage"]["completion_tokens"]
                    choices = event.get("choices") or []
                    if choices and choices[0].get("delta", {}).get("content"):
                        timing.first = timing.first or now
                        timing.last = now
        return timing

    return await be.staggered([0.0] * len(questions), one, questions)


def v1_mode(url: str, model: str, max_tokens: int, root_pid: int) -> Any:
    """Rounds of streamed /v1/chat/completions, with the CPU of `root_pid`'s process tree."""
    tree = ProcessTree(root_pid)

    def fn(level: int, offsets: list[float]) -> tuple:
        before = tree.snapshot()
        qs = [be.QUESTIONS[i % len(be.QUESTIONS)] for i in range(level)]
        wall, streams = asyncio.run(run_v1(url, model, qs, max_tokens))
        return wall, streams, tree.snapshot() - before

    return fn


def start_vllm_server(model_dir: str, kv_gib: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(int(kv_gib))}
    log = open(be.RESULTS_DIR / "vllm-server.log", "wb")  # noqa: SIM115 - lives with the server
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    command += ["--served-model-name", SERVED_NAME, "--port", str(port), "--enforce-eager"]
    command += ["--max-model-len", "2048", "--host", "127.0.0.1"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("vLLM's server exited; see benchmarks/results/vllm-server.log")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError("vLLM's server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse_tuned(specs: str) -> list[be.Service]:
    """`--tuned`: ';'-separated services, each 'key=value,...' of serve args and ENV=value (in
    capitals) for environment variables; each is labelled with its settings."""
    services = []
    for spec in filter(None, specs.split(";")):
        pairs = dict(kv.split("=", 1) for kv in spec.split(","))
        env = {k: v for k, v in pairs.items() if k.isupper()}
        args = {k: v for k, v in pairs.items() if not k.isupper()}
        services.append(be.Service(f"vllm tuned: {spec}", {"engine": "vllm", **args}, env))
    return services


def pin_off_compute(root_pid: int) -> list[int]:
    """An experiment: move every thread of the server's process tree, except vLLM's worker, off
    the cores vLLM's worker is bound to. Returns the cores they now run on."""
    import psutil

    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    workers = [p for p in procs if role_of(" ".join(p.cmdline())) == "engine_worker"]
    compute = set().union(*(p.cpu_affinity() for p in workers)) if workers else set()
    rest = sorted(set(range(psutil.cpu_count())) - compute)
    if not rest:
        return []
    for proc in procs:
        if proc in workers:
            continue
        for thread in proc.threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, rest)
    return rest


def run_service(
    service: be.Service,
    levels: list[int],
    rounds: int,
    tokens: int,
    tokenizer: Any,
    v1: bool,
    ttft_samples: int,
    pin: bool = False,
) -> list[be.Row]:
    """`serve run` with the service's settings, on /chat_stream (and /v1 with `v1`)."""
    print(f"serve run {service.args} {service.env} ...  load: {be.uptime()}", flush=True)
    server = be.start_service(service.args, service.env)
    try:
        if pin:
            print(f"  pinned off vLLM's compute cores to {pin_off_compute(server._proc.pid)}")
        label = service.label
        modes = {f"{label} /chat_stream": be.http_mode(server, be.QUESTIONS, tokens, tokenizer)}
        if v1:
            modes[f"{label} /v1"] = v1_mode(server.url, SERVED_NAME, tokens, server._proc.pid)
        for fn in modes.values():
            fn(2, [0.0, 0.0])  # warm-up
        return be.run_rounds(levels, rounds, modes, {}, {1: ttft_samples})
    finally:
        server.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--ttft-samples",
        type=int,
        default=20,
        help="rounds at 1 stream: its TTFT p50/p95 come from this many requests, one at a time "
        "(1-10 %% of engine=vllm's requests meet a 0.2-1.4 s stall; with 2 a p50 is luck)",
    )
    parser.add_argument("--quick", action="store_true", help="concurrency 1,8 and 1 round")
    parser.add_argument(
        "--rows",
        default="peer,vllm,transformers",
        help="which servers: peer (vLLM's own), vllm (engine=vllm, defaults), transformers",
    )
    parser.add_argument(
        "--tuned",
        default="",
        help="';'-separated engine=vllm services, each 'key=value,...' of serve args and "
        "ENV=value (capitals) for environment variables; run after the default rows",
    )
    parser.add_argument(
        "--pin-experiment",
        action="store_true",
        help="also engine=vllm with every process but vLLM's worker moved off its cores",
    )
    args = parser.parse_args(argv)
    levels = [1, 8] if args.quick else [int(c) for c in args.concurrency.split(",")]
    rounds = 1 if args.quick else args.rounds
    ttft_samples = 1 if args.quick else args.ttft_samples
    which = set(args.rows.split(","))
    be.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    config = ChatStreamConfig(engine="vllm")
    model_dir = vllm_model_dir(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = args.max_new_tokens
    rows: list[be.Row] = []

    if "peer" in which:
        print(f"vLLM's own server ...  load: {be.uptime()}", flush=True)
        proc, url = start_vllm_server(model_dir, config.cpu_kv_cache_gib)
        try:
            fn = v1_mode(url, SERVED_NAME, tokens, proc.pid)
            fn(2, [0.0, 0.0])  # warm-up
            rows += be.run_rounds(levels, rounds, {"vllm server": fn}, {}, {1: ttft_samples})
        finally:
            stop(proc)
    services = [be.Service("vllm", {"engine": "vllm"})] if "vllm" in which else []
    for service in services + parse_tuned(args.tuned):
        rows += run_service(
            service, levels, rounds, tokens, tokenizer, v1=True, ttft_samples=ttft_samples
        )
    if args.pin_experiment:
        pinned = be.Service("vllm tuned: stack pinned off the compute core", {"engine": "vllm"})
        rows += run_service(
            pinned, levels, rounds, tokens, tokenizer, v1=True, ttft_samples=ttft_samples, pin=True
        )
    if "transformers" in which:
        rows += run_service(
            be.Service("transformers", {}),
            levels,
            rounds,
            tokens,
            tokenizer,
            v1=False,
            ttft_samples=ttft_samples,
        )

    print_table(rows)
    report_targets(rows)
    out = be.RESULTS_DIR / f"bench-vllm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps([row.__dict__ for row in rows], indent=2))
    print(f"\nwritten: {out}  (load at the end: {be.uptime()})")
    return 0


def print_table(rows: list[be.Row]) -> None:
    """Markdown. CPU columns: ms of CPU per streamed token, summed over the rounds."""
    print(
        "\n| server | conc | agg tok/s | TTFT p50 | TTFT p95 | front-end CPU ms/token "
        "| split | engine ms/token (core + worker) | Ray daemons ms/token | core 0 / core 1 busy "
        "| others' cores |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        e = row.extra
        front = split = engine = ray = cores = others = "—"
        if "cpu_ms_front_end" in e:
            front = f"{e['cpu_ms_front_end']:.2f}"
            split = format_split(e)
            engine = f"{e['cpu_ms_engine_core']:.2f} + {e['cpu_ms_engine_worker']:.2f}"
            ray = f"{e['cpu_ms_ray_all']:.2f}"
            # Cores the rest of the machine took meanwhile (other users of the box).
            others = f"{e['cores_outside']:.2f}"
            cores = " / ".join(
                f"{e[k]:.0%}" for k in sorted(e) if k.startswith("core") and k.endswith("_busy")
            )
        print(
            f"| {row.mode} | {row.concurrency} | {row.aggregate_tok_s:.1f} | "
            f"{row.ttft_p50_ms:.0f} ms | {row.ttft_p95_ms:.0f} ms | {front} | {split} | "
            f"{engine} | {ray} | {cores} | {others} |"
        )
    print(
        f"\nfront end: {' + '.join(FRONT_END)} (whichever the server has; vLLM's own server: "
        "its API server process). Engine: vLLM's EngineCore and worker processes. Ray "
        "daemons: the rest of the server's process tree (GCS, raylet, dashboard, controller)."
    )


def report_targets(rows: list[be.Row]) -> None:
    """Issue 19's targets: >= 0.95x the peer's tok/s at 8 and 16; TTFT p50 at 1 within +10 ms."""
    get = {(r.mode, r.concurrency): r for r in rows}
    modes = sorted({r.mode for r in rows if r.mode.startswith("vllm") and r.mode != "vllm server"})
    for mode in modes:
        for level in (8, 16):
            peer, ours = get.get(("vllm server", level)), get.get((mode, level))
            if peer and ours:
                ratio = ours.aggregate_tok_s / peer.aggregate_tok_s
                print(f"{mode} at {level}: {ratio:.2f}x the peer's tok/s (target >= 0.95)")
        peer, ours = get.get(("vllm server", 1)), get.get((mode, 1))
        if peer and ours:
            delta = ours.ttft_p50_ms - peer.ttft_p50_ms
            print(f"{mode} TTFT p50 at 1: {delta:+.0f} ms vs the peer (target <= +10 ms)")


if __name__ == "__main__":
    raise SystemExit(main())
