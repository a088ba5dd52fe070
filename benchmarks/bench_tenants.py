"""Issue 22's flood against this tree and against the commit before the fair queue, on the same
machine in the same run: aggregate throughput (answers and tokens per second, both keys) and
the polite key's admissions and time to first chunk.

    python -m benchmarks.bench_tenants [--before adccfe5] [--window 40]

The old tree is a `git worktree` under /tmp (removed after); each service is `serve run` from
its own tree (LocalServe), driven by loadtest/flood.py from this process. Timings depend on the
machine's load: say what else ran when you quote them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.flood import FLOOD_SERVICE_ARGS, KEYS_ENV_VALUE, FloodResult, run_flood

REPO = Path(__file__).resolve().parents[1]
BEFORE_FAIR_QUEUE = "adccfe5"  # the parent of ecfd43d, which added serve_app/fair_queue.py

# Run inside the tree under test, so `serve run` and its workers import that tree's serve_app.
_SERVE_CHILD = """
import json, sys
from serve_app.local_server import LocalServe
with LocalServe(json.loads(sys.argv[1]), env={"CHATSTREAM_API_KEYS": sys.argv[2]}) as server:
    print(server.url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def measure(tree: Path, window_s: float) -> FloodResult:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'operator'}"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SERVE_CHILD, json.dumps(FLOOD_SERVICE_ARGS), KEYS_ENV_VALUE],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = child.stdout.readline().strip()
        if not url:
            raise RuntimeError(f"the service of {tree} did not start")
        return asyncio.run(run_flood(url, min_window_s=window_s))
    finally:
        child.stdin.close()
        child.wait(timeout=120)


def row(name: str, r: FloodResult) -> str:
    p50 = statistics.median(r.polite.first_chunk_s) if r.polite.first_chunk_s else float("nan")
    refused = sum(r.flood.refused.values())
    return (
        f"{name:<22} {r.window_s:>7.1f} {r.window_answers / r.window_s:>9.2f} "
        f"{r.window_tokens / r.window_s:>9.1f} {r.flood.answers:>8} {refused:>8} "
        f"{r.polite.admitted:>5}/{r.polite.admitted + sum(r.polite.refused.values())} "
        f"{p50:>9.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE_FAIR_QUEUE, help="the commit to compare with")
    parser.add_argument("--window", type=float, default=40.0, help="seconds measured, at least")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatstream-before-") as scratch:
        old_tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), options.before],
            check=True,
            capture_output=True,
        )
        try:
            results = [
                (f"before ({options.before})", measure(old_tree, options.window)),
                ("this tree", measure(REPO, options.window)),
            ]
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)],
                check=False,
            )
    print(
        f"{'tree':<22} {'window':>7} {'answers/s':>9} {'tokens/s':>9} {'flood ok':>8} "
        f"{'flood 429':>8} {'polite':>7} {'TTFT p50':>9}"
    )
    for name, result in results:
        print(row(name, result))
    print(
        "window: from the polite key's first request; answers/s and tokens/s: both keys' answers "
        "read to the end inside it; TTFT p50: the polite key's time to first chunk (s)"
    )


if __name__ == "__main__":
    main()
