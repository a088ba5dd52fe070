"""Row surgery on a Hugging Face `DynamicCache` for continuous batching: rows join (left-padded
to a common length) and leave (columns that became all padding are trimmed).

The batch keeps one cache whose rows are left-padded to a common length, so a decode step has
exactly the shape `model.generate` uses; an attention mask (1 = real token) hides the padding.

Why not transformers' own `ContinuousBatchingManager` (transformers 5.23, `generate_batch` /
`init_continuous_batching`)? Measured on this 2-core CPU box with SmolLM2-135M float32, 8 chat
prompts, greedy, 64 new tokens, each variant alone in its own process: 44-71 tok/s aggregate
for the manager against 119-126 tok/s for this scheduler (a static `model.generate` batch of 8
makes ~130). Its paged KV cache, block tables and per-step bookkeeping are built for GPUs
(flash/paged attention, CUDA graphs) and cost more than they save on CPU. It also fixes
`do_sample` for the whole manager (greedy and sampled requests cannot share a batch) and honours
per-request temperature/top-k/top-p only when the global config enables them, while ChatStream
needs per-request params. Its greedy output did match ours token for token. A left-padded
DynamicCache keeps decode steps exactly the shape `generate` uses, so a step costs what a
static batch step costs.
"""

from __future__ import annotations

from typing import Any

import torch


def cache_supports_row_surgery(cache: Any) -> bool:
    """Only plain full-attention layers can be left-padded and merged row by row.

    Sliding-window or indexed layers keep extra per-sequence state; a model with them runs one
    request at a time (still correct, just not batched).
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(t: torch.Tensor, amount: int) -> torch.Tensor:
    """Pad dim -2 (sequence) of a [batch, heads, seq, dim] tensor with `amount` zeros in front."""
    if amount == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], amount, t.shape[3])
    return torch.cat([pad, t], dim=-2)


def merge_rows(
    batch_cache: Any, batch_mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor
) -> torch.Tensor:
    """Append the rows of `new_cache` to `batch_cache` (in place); returns the merged mask.

    Both are left-padded to the longer of the two so every row's newest token sits in the last
    column; the mask (1 = real token) keeps padding invisible to attention.
    """
    batch_len, new_len = batch_mask.shape[1], new_mask.shape[1]
    length = max(batch_len, new_len)
    for dst, src in zip(batch_cache.layers, new_cache.layers, strict=True):
        dst.keys = torch.cat(
            [_left_pad(dst.keys, length - batch_len), _left_pad(src.keys, length - new_len)], dim=0
        )
        dst.values = torch.cat(
            [_left_pad(dst.values, length - batch_len), _left_pad(src.values, length - new_len)],
            dim=0,
        )
    pad = batch_mask.new_zeros
    return torch.cat(
        [
            torch.cat([pad(batch_mask.shape[0], length - batch_len), batch_mask], dim=1),
            torch.cat([pad(new_mask.shape[0], length - new_len), new_mask], dim=1),
        ],
        dim=0,
    )


def keep_rows(cache: Any, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only rows `keep` of the cache (in place) and drop columns that are now all padding.

    Trimming matters: without it a long finished request would leave every later step paying
    attention over its padding.
    """
    mask = mask.index_select(0, keep)
    first_used = int(torch.nonzero(mask.any(dim=0))[0])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, keep)[:, :, first_used:, :]
        layer.values = layer.values.index_select(0, keep)[:, :, first_used:, :]
    return mask[:, first_used:]


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class BatchCache:
    """The decoding batch: its requests (`rows`), their KV cache and attention mask, row i of
    the cache and mask belonging to `rows[i]`."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [batch, cache_len], 1 = real token

    def join(self, rows: list[Any], cache: Any, mask: torch.Tensor) -> None:
        """Add `rows`, prefilled into a cache of their own with its `mask`."""
        if self.rows:
            self.mask = merge_rows(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.rows.extend(rows)

    def retain(self, keep: list[int]) -> None:
        """Keep only the rows at the indices `keep` (in order); the others leave."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        self.mask = keep_rows(self.cache, self.mask, torch.tensor(keep, device=self.mask.device))
