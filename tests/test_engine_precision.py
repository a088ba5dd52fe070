"""The CPU precisions a model replica can run in: threads it computes with, and fidelity of the
faster paths to float32 (teacher-forced top-1 agreement on a short fixed prompt set)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_app.config import ChatStreamConfig  # noqa: E402
from serve_app.engines.base import ChatMessage  # noqa: E402
from serve_app.engines.chat_tokens import prompt_token_ids  # noqa: E402
from serve_app.engines.hf_loading import apply_precision, load_model, load_tokenizer  # noqa: E402
from serve_app.engines.quantize import Float32Head, teacher_forced_agreement  # noqa: E402
from serve_app.engines.threads import torch_threads, usable_cores  # noqa: E402
from serve_app.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersPromptFormatter,
)

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how airplanes stay in the air.",
    "Describe the history of the Roman Empire.",
]
TOKENS = 32


def test_torch_threads_follow_the_cpu_allotment() -> None:
    cores = usable_cores()
    assert torch_threads(ChatStreamConfig()) == cores  # local `serve run`: the whole box
    assert torch_threads(ChatStreamConfig(num_cpus=1)) == 1
    assert torch_threads(ChatStreamConfig(num_cpus=0.5)) == 1  # at least one
    assert torch_threads(ChatStreamConfig(num_cpus=512)) == cores  # never more than usable
    # Ray's assignment wins over the argument (a Serve config may override ray_actor_options).
    assert torch_threads(ChatStreamConfig(num_cpus=4), allotment=1.0) == 1
    assert torch_threads(ChatStreamConfig(num_cpus=1, torch_threads=3)) == 3


@pytest.fixture(scope="module")
def reference():
    config = ChatStreamConfig(dtype="float32")
    model, _ = load_model(config)
    tokenizer = load_tokenizer(config)
    formatter = TransformersPromptFormatter(config)
    prompts = [
        prompt_token_ids(tokenizer, formatter.render([ChatMessage("user", q)])) for q in PROMPTS
    ]
    sequences = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=TOKENS,
                min_new_tokens=TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
            sequences.append(out[0].tolist())
    return model, tokenizer, sequences, [len(p) for p in prompts]


async def test_replica_worker_computes_with_the_threads_of_its_allotment(reference) -> None:
    model, tokenizer, _, _ = reference
    engine = TransformersEngine(ChatStreamConfig(num_cpus=1))
    engine.start_with(model, tokenizer, "cpu", 8192)
    try:
        assert engine.num_threads == 1
        assert await engine.run_on_model_thread(torch.get_num_threads) == 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("dtype", "quantization", "at_least"),
    [
        # Measured on 8 prompts x 64 tokens: bf16 98.6 %, int8 93.8 % (README, Performance).
        ("bfloat16", "none", 0.95),
        ("bfloat16", "int8", 0.88),
    ],
)
def test_faster_cpu_paths_agree_with_float32(reference, dtype, quantization, at_least) -> None:
    model, tokenizer, sequences, prompt_lens = reference
    candidate = apply_precision(copy.deepcopy(model), dtype, quantization)
    matches, total = teacher_forced_agreement(model, candidate, sequences, prompt_lens)
    assert total == len(PROMPTS) * TOKENS
    print(f"{dtype}/{quantization}: {matches}/{total}")
    assert matches / total >= at_least, f"{dtype}/{quantization}: {matches}/{total}"
    # And it still answers sensibly on its own.
    ids = prompt_token_ids(
        tokenizer,
        TransformersPromptFormatter(ChatStreamConfig()).render(
            [ChatMessage("user", "What is the capital of France?")]
        ),
    )
    with torch.inference_mode():
        out = candidate.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert "Paris" in tokenizer.decode(out[0, len(ids) :])


def test_bfloat16_keeps_the_lm_head_and_rotary_frequencies_in_float32(reference) -> None:
    candidate = apply_precision(copy.deepcopy(reference[0]), "bfloat16", "none")
    assert isinstance(candidate.get_output_embeddings(), Float32Head)
    assert candidate.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(
        b.dtype == torch.float32 for n, b in candidate.named_buffers() if n.endswith("inv_freq")
    )
    # The embedding is no longer tied to the (float32) head.
    assert candidate.get_input_embeddings().weight.dtype == torch.bfloat16


def test_float32_head_scores_the_best_candidates_exactly_in_float32() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 64) * 0.05
    head = Float32Head(weight)
    hidden = torch.randn(6, 3, 64).to(torch.bfloat16)
    exact = torch.nn.functional.linear(hidden.float(), weight)
    with torch.inference_mode():
        logits = head(hidden)
    assert logits.dtype == torch.float32 and logits.shape == exact.shape
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # The best candidates carry float32 products (the tail of the rescored set may differ from
    # float32's own top 16 by a near-tie); the rest are bfloat16 products.
    top = exact.topk(Float32Head.RESCORED // 2, dim=-1).indices
    assert torch.allclose(logits.gather(-1, top), exact.gather(-1, top), rtol=0, atol=1e-5)
    assert (logits - exact).abs().max() < 0.05
    # The model hands the head a strided view of the last position: same logits.
    last = hidden[:, -1:, :]
    with torch.inference_mode():
        assert torch.equal(head(last), head(last.contiguous()))
