"""What OpenAI's logits controls and the grammar mask add to a decode step, per row.

    .venv/bin/python benchmarks/bench_logits_controls.py [--batch 8] [--repeats 50]

Times the work between the model's forward pass and the chosen tokens for one batch of logits
of the real vocabulary (SmolLM2, 49152), with the real tokenizer's llguidance index:

  before          `sample_tokens` alone (the code path before the controls existed)
  cheap path      `next_tokens` with no row asking for anything (what greedy rows pay now)
  <control> xN    N rows with that control, the others plain
  grammar xN      N rows under a JSON schema, each matcher mid-string (the widest masks) or
                  between values, mask computed and applied every step (the matcher does not
                  advance, so every repeat computes the same mask: no cache in between)

and, for scale, the forward pass of one decode step of the same batch (the embedded model,
~100 cached tokens per row). Median and p90 over the repeats, in milliseconds; the machine's
load (`os.getloadavg`) is printed with the table: on a shared 2-core machine, rerun to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from serve_app.config import ChatStreamConfig, GenerationParams  # noqa: E402
from serve_app.engines.grammar import GrammarCompiler  # noqa: E402
from serve_app.engines.hf_loading import load_model, load_tokenizer  # noqa: E402
from serve_app.engines.kv_cache import new_cache  # noqa: E402
from serve_app.engines.logits_processing import controls_for, next_tokens  # noqa: E402
from serve_app.engines.sampling import eos_token_ids, sample_tokens  # noqa: E402
from serve_app.model_contract import GenerationRequest, OutputConstraint  # noqa: E402

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=64)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PREFIXES = {"mid-string": '{"name": "Lena and', "between values": '{"name": "Lena", '}


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    config = ChatStreamConfig()
    tokenizer = load_tokenizer(config)
    model, device = load_model(config)
    vocab = model.config.vocab_size
    eos = sorted(eos_token_ids(model, tokenizer))
    batch = args.batch
    logits = torch.randn(batch, vocab, dtype=model.dtype)
    compiler = GrammarCompiler.for_hf_tokenizer(tokenizer, vocab, eos)
    constraint = OutputConstraint("json_schema", json.dumps(SCHEMA))

    def rows(n: int, **fields) -> list[SimpleNamespace]:
        out = []
        for i in range(batch):
            controls = None
            if i < n:
                prefix = fields.get("_prefix")
                grammar = None
                if prefix is not None:
                    grammar = compiler.matcher(constraint)
                    for token in tokenizer.encode(prefix, add_special_tokens=False):
                        grammar.advance(token)
                spec = {k: v for k, v in fields.items() if k != "_prefix"}
                controls = controls_for(
                    GenerationRequest("", GREEDY, **spec), vocab, "cpu", grammar
                )
                if controls is not None and controls.counts is not None:
                    controls.counts[torch.randint(0, vocab, (64,))] += 1  # 64 tokens said
            out.append(SimpleNamespace(params=GREEDY, generator=None, controls=controls))
        return out

    plain = rows(0)
    cases: list[tuple[str, object]] = [
        ("before: sample_tokens", lambda: sample_tokens(logits, plain))
    ]
    cases.append(("cheap path: next_tokens", lambda: next_tokens(logits, plain, eos)))
    for n in sorted({1, batch}):
        for label, fields in [
            ("logprobs=5", {"logprobs": 5}),
            ("penalties", {"presence_penalty": 0.5, "frequency_penalty": 0.5}),
            ("logit_bias (4 ids)", {"logit_bias": ((1, 1.0), (2, -1.0), (3, 2.0), (4, -5.0))}),
            ("min_tokens", {"min_tokens": 1000}),
        ]:
            r = rows(n, **fields)
            cases.append((f"{label} x{n}", lambda r=r: next_tokens(logits, r, eos)))
        for where, prefix in PREFIXES.items():
            r = rows(n, _prefix=prefix)
            cases.append((f"grammar {where} x{n}", lambda r=r: next_tokens(logits, r, eos)))

    cache = new_cache(model)
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (batch, 100))
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step_ids = torch.randint(0, vocab, (batch, 1))

        def forward() -> None:
            model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop it again: stay at 100 cached tokens

        results = [(label, *timed(fn, args.repeats)) for label, fn in cases]
        results.append((f"forward pass, decode step x{batch}", *timed(forward, 10)))
    print(f"batch {batch}, vocab {vocab}, {args.repeats} repeats, load {os.getloadavg()}")
    print(f"{'case':<40} {'p50 ms':>8} {'p90 ms':>8}")
    for label, p50, p90 in results:
        print(f"{label:<40} {p50:8.3f} {p90:8.3f}")


if __name__ == "__main__":
    main()
