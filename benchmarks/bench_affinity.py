"""Multi-turn chats over 2 model replicas, session affinity (and so KV prefix reuse) on and off.

Each run starts `serve run serve_app:app num_replicas=2 session_affinity=<on|off>` (the command
a user runs, LocalServe), warms it up, then runs `--sessions` conversations at once over
`/v1/chat/completions` (streamed, greedy, `prompt_cache_key` = the conversation), each
`--turns` turns of ~`--user-tokens`-token user messages and `--answer-tokens`-token answers;
every turn re-sends the whole history, as a chat client does. Prints TTFT p50/p95 per turn
number and the aggregate completion tokens/s of each run, as a Markdown table, how the
router's rendezvous hash spreads the sessions over the replicas (from Ray's dashboard), then the
issue's targets (last turn p50 <= 1.3 x turn 1; tok/s with affinity not below without).

The headline table, on a quiet machine (each server runs alone, one after the other):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_affinity.py --turns 6
    PYTHONPATH=$PWD /path/to/vllm-venv/bin/python benchmarks/bench_affinity.py --turns 6 \
        --engine vllm

`--engine vllm` needs an interpreter with vLLM (`bash scripts/setup.sh --vllm`); there the
reuse is vLLM's automatic prefix caching, always on, so its modes are `on,off` (no `none`).
If two vLLM replicas do not fit, `--off-replicas` gives the control rows their own count
(e.g. `--replicas 1 --off-replicas 2`: one replica with affinity against two without);
`--server-arg key=value` passes any other setting (e.g. `cpu_kv_cache_gib=1`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx

from serve_app.config import MODEL_DEPLOYMENT_NAME
from serve_app.local_server import LocalServe
from serve_app.session_router import hash_order
from tests.ray_cluster import auth_headers  # the cluster's token, as the tests send it

RAY_DASHBOARD = "http://127.0.0.1:8265"  # the Ray cluster `serve run` starts

WORDS = [
    "river",
    "mountain",
    "window",
    "garden",
    "lantern",
    "harbor",
    "meadow",
    "engine",
    "silver",
    "forest",
    "candle",
    "bridge",
    "market",
    "thunder",
    "velvet",
    "orchard",
    "compass",
    "pebble",
    "canyon",
    "meadow",
    "whistle",
    "marble",
    "feather",
    "island",
    "ladder",
    "copper",
    "blossom",
    "anchor",
    "signal",
    "harvest",
    "glacier",
    "violin",
    "tunnel",
    "saddle",
    "prairie",
    "beacon",
]


def user_turn(session: int, turn: int, tokens: int) -> str:
    """About `tokens` tokens of text (SmolLM2's tokenizer: ~1.3 tokens per word here)."""
    rng = random.Random(session * 1000 + turn)
    words = " ".join(rng.choice(WORDS) for _ in range(int(tokens / 1.3)))
    return f"Here are some notes: {words}. Summarize them in one sentence."


MODEL = {"name": ""}  # what the server serves (GET /v1/models), set once per run


async def one_turn(
    client: httpx.AsyncClient, messages: list[dict], key: str, answer_tokens: int
) -> tuple[float, str, int]:
    """(TTFT in s, answer text, completion tokens) of one streamed turn."""
    body = {
        "model": MODEL["name"],
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": answer_tokens,
        "prompt_cache_key": key,
    }
    start = time.monotonic()
    ttft, text, tokens = None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content")
                if delta:
                    ttft = ttft if ttft is not None else time.monotonic() - start
                    text.append(delta)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.monotonic() - start), "".join(text), tokens


async def conversation(
    client: httpx.AsyncClient, session: int, args: argparse.Namespace, tag: str
) -> list[tuple[float, int]]:
    messages: list[dict[str, str]] = []
    out = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_turn(session, turn, args.user_tokens)})
        ttft, text, tokens = await one_turn(
            client, messages, f"{tag}-{session}", args.answer_tokens
        )
        messages.append({"role": "assistant", "content": text})
        out.append((ttft, tokens))
    return out


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


async def run(url: str, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        MODEL["name"] = (await client.get("/v1/models")).json()["data"][0]["id"]
        # Warm-up: one short conversation per replica's worth, not measured.
        await asyncio.gather(
            *(
                one_turn(client, [{"role": "user", "content": "Hi"}], f"warm-{i}", 8)
                for i in range(4)
            )
        )
        start = time.monotonic()
        results = await asyncio.gather(
            *(conversation(client, s, args, tag) for s in range(args.sessions))
        )
        wall = time.monotonic() - start
        load = (await client.get("/load")).json()
    keys = [f"v1:{tag}-{s}" for s in range(args.sessions)]  # protocol.session_key's
    per_turn = [[r[t][0] for r in results] for t in range(args.turns)]
    tokens = sum(tok for r in results for _, tok in r)
    return {
        "p50": [statistics.median(v) for v in per_turn],
        "p95": [percentile(v, 95) for v in per_turn],
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
        "routing": load.get("routing"),
        "sessions_per_replica": sessions_per_replica(keys),
    }


def sessions_per_replica(keys: list[str]) -> list[int]:
    """How the router's rendezvous hashing spreads the sessions `keys` over the running model
    replicas, most first (an uneven split leaves a core idle while the other queues); [] if
    Ray's dashboard does not answer."""
    try:
        reply = httpx.get(
            f"{RAY_DASHBOARD}/api/serve/applications/", headers=auth_headers(), timeout=10
        )
        apps = reply.json()["applications"]
    except (httpx.HTTPError, KeyError, ValueError):
        return []
    replicas = [
        replica["replica_id"]
        for app in apps.values()
        for replica in app["deployments"].get(MODEL_DEPLOYMENT_NAME, {}).get("replicas", [])
        if replica.get("state") == "RUNNING"
    ]
    if not replicas:
        return []
    chosen = Counter(hash_order(key, replicas)[0] for key in keys)
    return sorted((chosen.get(r, 0) for r in replicas), reverse=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-tokens", type=int, default=200)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--off-replicas", type=int, default=0, help="replicas of the off/none rows (0: --replicas)"
    )
    parser.add_argument(
        "--modes",
        default="on,off",
        help="on: session affinity; off: Serve's router (a turn reuses its prefix only when it "
        "lands on the replica that keeps it); none: off and no prefix cache (every turn "
        "prefills its whole history; transformers engine only)",
    )
    parser.add_argument("--engine", default="transformers")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another `serve run` setting (a ChatStreamConfig field), repeatable",
    )
    args = parser.parse_args()
    if args.engine == "vllm":
        if "none" in args.modes.split(","):
            parser.error("engine=vllm always reuses prefixes (vLLM's automatic prefix caching)")
        if importlib.util.find_spec("vllm") is None:
            parser.error(
                "engine=vllm: this Python has no vLLM; run the script with the interpreter of "
                "a venv that has it (bash scripts/setup.sh --vllm)"
            )
    if any("=" not in item for item in args.server_arg):
        parser.error("--server-arg takes KEY=VALUE")
    return args


def server_args(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    replicas = args.replicas if mode == "on" else (args.off_replicas or args.replicas)
    settings: dict[str, Any] = {
        "engine": args.engine,
        "num_replicas": replicas,
        "session_affinity": mode == "on",
    }
    if mode == "none":
        settings["prefix_cache_mb"] = 0
    return settings | dict(item.split("=", 1) for item in args.server_arg)


def main() -> None:
    args = parse_args()
    rows = {}
    for mode in args.modes.split(","):
        settings = server_args(args, mode)
        with LocalServe(settings, startup_timeout_s=900) as server:
            rows[mode] = asyncio.run(run(server.url, args, tag=f"{mode}-{time.time_ns()}"))
        rows[mode]["replicas"] = settings["num_replicas"]
        print(mode, json.dumps(rows[mode]), flush=True)

    turns = range(1, args.turns + 1)
    print(f"\nengine={args.engine}, {args.sessions} sessions x {args.turns} turns")
    print(
        "\n| affinity | replicas | "
        + " | ".join(f"turn {t} p50 / p95 (s)" for t in turns)
        + " | tok/s |"
    )
    print("|---" * (args.turns + 3) + "|")
    for mode, row in rows.items():
        cells = " | ".join(
            f"{a:.2f} / {b:.2f}" for a, b in zip(row["p50"], row["p95"], strict=True)
        )
        print(f"| {mode} | {row['replicas']} | {cells} | {row['tok_s']:.1f} |")
    for mode, row in rows.items():
        ratio = row["p50"][-1] / row["p50"][0]
        split = "/".join(map(str, row.get("sessions_per_replica") or [])) or "?"
        print(
            f"{mode}: last-turn p50 / turn-1 p50 = {ratio:.2f}; routing {row['routing']}; "
            f"sessions per replica by the affine hash: {split}"
        )
    if "on" in rows:
        on = rows["on"]
        ratio = on["p50"][-1] / on["p50"][0]
        verdict = "met" if ratio <= 1.3 else "missed"
        print(f"target last turn <= 1.3 x turn 1 (on): {ratio:.2f} x, {verdict}")
        for mode in ("off", "none"):
            if mode in rows:
                met = on["tok_s"] >= rows[mode]["tok_s"]
                print(
                    f"target tok/s on >= {mode}: {on['tok_s']:.1f} vs {rows[mode]['tok_s']:.1f}, "
                    + ("met" if met else "missed")
                )


if __name__ == "__main__":
    main()
