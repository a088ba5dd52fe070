"""Speed and fidelity of the CPU precisions the engine offers (fp32, bf16, int8 weight-only).

    .venv/bin/python benchmarks/bench_precision.py [--prompts 8] [--tokens 64] [--threads 0]
    .venv/bin/python benchmarks/bench_precision.py --compile   # adds bfloat16 + torch.compile

Fidelity is teacher-forced top-1 agreement with float32: the float32 model's greedy continuation
of each prompt is fed to both models, and a position counts when both predict the same next
token. Free-running greedy text is printed side by side for a look, not scored (it diverges
after a few dozen tokens even when the model is fine). Speed is a static `model.generate` batch
(greedy, all rows forced to the full length) at batch 1 and 8: aggregate new tokens per second.
With `--compile`, the bfloat16 model's forward is also run through `torch.compile` (inductor,
dynamic shapes); its row reports the compile time the first calls took, batch 1 included.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from serve_app.config import ChatStreamConfig  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.chat_tokens import prompt_token_ids  # noqa: E402
from serve_app.engines.hf_loading import apply_precision, load_model, load_tokenizer  # noqa: E402
from serve_app.engines.quantize import teacher_forced_agreement  # noqa: E402
from serve_app.engines.transformers_engine import TransformersPromptFormatter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import QUESTIONS  # noqa: E402

VARIANTS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")]
COMPILED = ("bfloat16", "torch.compile")


def generate(model, tokenizer, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    pad = tokenizer.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return time.perf_counter() - start, out[:, width:].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="add bfloat16 + torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"torch threads {torch.get_num_threads()}; load: {load}", flush=True)
    config = ChatStreamConfig(dtype="float32")
    tokenizer = load_tokenizer(config)
    formatter = TransformersPromptFormatter(config)
    reference, _ = load_model(config)
    prompts = [
        prompt_token_ids(tokenizer, formatter.render([ChatMessage("user", q)]))
        for q in QUESTIONS[: args.prompts]
    ]
    # The reference continuation: float32 greedy, one prompt at a time (no padding).
    sequences = []
    for p in prompts:
        _, out = generate(reference, tokenizer, [p], args.tokens)
        sequences.append(p + out[0])
    lens = [len(p) for p in prompts]
    texts = {}
    for dtype, quantization in VARIANTS + ([COMPILED] if args.compile else []):
        model = copy.deepcopy(reference)
        apply_precision(model, dtype, "none" if (dtype, quantization) == COMPILED else quantization)
        if (dtype, quantization) == COMPILED:
            started = time.perf_counter()
            model.forward = torch.compile(model.forward, dynamic=True)
            for batch in (1, 2):  # batch 1 is a shape of its own (recompiles)
                generate(model, tokenizer, prompts[:batch], 4)
            print(f"torch.compile: first calls took {time.perf_counter() - started:.0f} s")
        matches, total = teacher_forced_agreement(reference, model, sequences, lens)
        generate(model, tokenizer, prompts[:2], 4)  # warm-up
        rates = {}
        for batch in (1, 8):
            wall, _ = generate(
                model, tokenizer, prompts[:batch] * (batch // len(prompts[:batch])), args.tokens
            )
            rates[batch] = batch * args.tokens / wall
        _, out = generate(model, tokenizer, prompts[:1], 48)
        texts[(dtype, quantization)] = tokenizer.decode(out[0], skip_special_tokens=True)
        print(
            f"{dtype:<9} quant={quantization:<5} agreement {matches}/{total} = "
            f"{100 * matches / total:.1f} %   batch 1: {rates[1]:.1f} tok/s   "
            f"batch 8: {rates[8]:.1f} tok/s",
            flush=True,
        )
        del model
    print("\nfree-running greedy, first prompt:", QUESTIONS[0])
    for key, text in texts.items():
        print(f"--- {key[0]} {key[1]}:\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
