"""Choosing the next token and deciding when a generation ends (pure functions of logits and
counts; no model, no scheduler state).

Every row of a batch samples with its own parameters. A row whose request carries a `seed`
samples with its own `torch.Generator`, so a seeded request gives the same text alone or beside
others; greedy rows never touch a generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from serve_app.config import GenerationParams


class SamplingRow(Protocol):
    """What sampling needs of a request: its parameters and its generator (None: the global one)."""

    params: GenerationParams
    generator: torch.Generator | None


def seeded_generator(seed: int | None, device: str) -> torch.Generator | None:
    """A generator of its own for a request with a seed (None without one)."""
    if seed is None:
        return None
    # Any integer is a valid seed: torch takes 64 bits.
    return torch.Generator(device=device).manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (1-D) with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None = None
) -> int:
    """The next token id from one row of logits: argmax when temperature is 0, else sampled."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits.float() / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int | Exception]:
    """Next token ids for a batch of logit rows, each with its own parameters and generator.

    Greedy rows share one argmax and a single device-to-host copy (on a GPU, one sync per step
    rather than one per row); only sampled rows are handled one by one. A row whose sampling
    fails gets the exception in its place: it fails that request only, never the batch.
    """
    tokens: list[int | Exception] = torch.argmax(logits, dim=-1).tolist()
    for index, row in enumerate(rows):
        if row.params.temperature != 0.0:
            try:
                tokens[index] = sample_token(logits[index], row.params, row.generator)
            except Exception as exc:  # e.g. non-finite logits in that row only
                tokens[index] = exc
    return tokens


def stop_reason(
    token_id: int,
    num_generated: int,
    prompt_len: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    context_length: int,
) -> str | None:
    """Why generation ends after `token_id` (the `num_generated`-th new token), or None."""
    if token_id in eos_ids:
        return "eos"
    if num_generated >= max_new_tokens:
        return "length"
    if prompt_len + num_generated >= context_length:
        return "context"
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end an answer: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
