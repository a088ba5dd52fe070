"""Lower-precision weights for CPU decoding: int8 weight-only, per output channel.

Decoding streams every weight from memory for every step, so bytes per weight bound the speed of
a small batch on CPU. `int8` keeps each `nn.Linear` weight as int8 with one scale per output
channel (symmetric, round to nearest) and multiplies with torch's own weight-only kernel
(`aten._weight_int8pack_mm`, the one gpt-fast uses), with bfloat16 activations. Per-channel
scales matter: one scale per tensor (what `torch.ao.quantization.quantize_dynamic` does by
default) let outlier channels crush the others and produced degenerate text here.

That kernel is fast for a few rows (decode steps of small batches) and slower than a bfloat16
matrix product for many rows (prefill, large batches), so each layer keeps the int8 weight and
switches to dequantize-then-bf16-matmul when a call has more than `rows_int8_max` rows.
Measured numbers and fidelity are in the README's Performance section and
`benchmarks/bench_precision.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Above this many rows (tokens in the call), dequantizing and using the bf16 matrix product is
# faster than the int8 kernel (measured on AVX-512 BF16: break-even between 4 and 8 rows).
ROWS_INT8_MAX = 4


class Float32Head(nn.Module):
    """An LM head whose top logits are exact float32 products of a lower-precision hidden state.

    The next token is an argmax over the logits, and near-ties decide it: bfloat16 logits (8
    mantissa bits) flip more of them. A float32 head raised teacher-forced agreement with the
    float32 model from 96.7 % to 98.6 % here, but as the largest matrix of a small model it
    cost a fifth of each decode step (the vocabulary's float32 rows are read for every step).
    So the whole vocabulary is scored in bfloat16 and only the `RESCORED` best candidates of
    each position are recomputed in float32: the argmax is the float32 head's whenever it is
    among them (a bfloat16 error large enough to push it out of the top 16 was never seen).
    Sampling reads the other logits at bfloat16 precision, about 0.4 % relative.
    """

    RESCORED = 16

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.register_buffer("weight_bf16", self.weight.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A fresh copy with plain strides: the model hands over a view of the last position,
        # and the bfloat16 matrix product on such a view took 100x longer here at 8 rows (414
        # ms instead of 4) and 45 ms more at 1 row, where `.contiguous()` keeps the view.
        x = x.to(torch.bfloat16).clone(memory_format=torch.contiguous_format)
        logits = torch.nn.functional.linear(x, self.weight_bf16).float()
        top = logits.topk(min(self.RESCORED, logits.shape[-1]), dim=-1).indices
        exact = (self.weight[top] @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, top, exact)


def cast_keeping_rotary(model: Any, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except rotary-embedding frequencies (`inv_freq` buffers), which stay
    float32: in bfloat16 they would shift every position's angle (transformers keeps them in
    float32 when a model is loaded in bfloat16, too)."""
    kept = {name: b for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, buffer in kept.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffer.float())


def to_bfloat16_with_float32_head(model: Any) -> Any:
    """Cast `model` to bfloat16 in place, except its LM head (`Float32Head`, untied)."""
    head = model.get_output_embeddings()
    weight = head.weight.detach().float().clone()
    cast_keeping_rotary(model, torch.bfloat16)
    model.set_output_embeddings(Float32Head(weight))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return model


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with weight ~= int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8WeightOnlyLinear(nn.Module):
    """`nn.Linear` with an int8 per-channel weight; computes in `dtype` (bfloat16)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel_int8(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scale.to(dtype))
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.dtype)
        if x2.shape[0] <= ROWS_INT8_MAX:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:
            weight = self.weight_int8.to(self.dtype) * self.scales[:, None]
            y = torch.nn.functional.linear(x2, weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8_weight_only(model: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every `nn.Linear` of `model` (the LM head included, untied from the embedding)
    with `Int8WeightOnlyLinear`, in place; everything else is cast to `dtype`. Returns how many
    layers were replaced. CPU only: the kernel has no CUDA implementation in every torch."""
    cast_keeping_rotary(model, dtype)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, Int8WeightOnlyLinear(child, dtype))
    # A tied LM head shared its weight with the embedding; it is now its own int8 copy.
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return len(targets)


def teacher_forced_agreement(
    reference: Any, candidate: Any, sequences: list[list[int]], prompt_lens: list[int]
) -> tuple[int, int]:
    """(positions where the next-token argmax of `candidate` matches `reference`, positions).

    Each sequence is a prompt followed by the reference's own greedy continuation; both models
    read the same tokens (teacher forcing), so one early difference does not derail the rest.
    Only the continuation's positions count (the prediction of each continuation token).
    """
    matches = total = 0
    with torch.inference_mode():
        for ids, prompt_len in zip(sequences, prompt_lens, strict=True):
            x = torch.tensor([ids])
            ref = reference(input_ids=x).logits[0, prompt_len - 1 : -1].argmax(-1)
            got = candidate(input_ids=x).logits[0, prompt_len - 1 : -1].argmax(-1)
            matches += int((ref == got).sum())
            total += ref.numel()
    return matches, total
