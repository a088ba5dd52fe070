"""Each session's KV cache kept between its turns, so a new turn prefills only its new tokens.

A chat turn re-sends the whole conversation; without this, every turn prefills its entire
history again. After a turn the scheduler keeps its row's KV (prompt plus answer) here, under
the request's session key (`GenerationRequest.session`), in an LRU bounded in bytes. The next
turn of that session takes it back: the longest common prefix of the kept token ids and the new
prompt is reused, the rest of the kept cache is dropped. So a cut answer, a regenerate (the
prompt stops before the old answer) or a cleared conversation (nothing in common) reuses only
what still matches, and the output is the one a full prefill gives. KV entries of a causal LM
depend only on the tokens before them, which is what makes a prefix reusable.

Pure bookkeeping, no model: `kv_cache.py` cuts rows out of and into the batch's cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# One layer's (keys, values), each [1, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class KeptPrefix:
    """Token ids and, per layer, their KV (token i of `ids` at position i of the tensors)."""

    ids: list[int]
    layers: list[LayerKV]

    @property
    def nbytes(self) -> int:
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers
        )

    def truncated(self, length: int) -> KeptPrefix:
        if length == len(self.ids):
            return self
        return KeptPrefix(
            self.ids[:length], [(k[:, :, :length, :], v[:, :, :length, :]) for k, v in self.layers]
        )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reusable_length(kept_ids: list[int], prompt_ids: list[int]) -> int:
    """Tokens of a kept cache that a prompt may reuse: their common prefix, but never the
    prompt's last token, which must run through the model to give the first token's logits."""
    return min(common_prefix_length(kept_ids, prompt_ids), len(prompt_ids) - 1)


class PrefixCache:
    """Kept prefixes by session, least recently used first out, at most `budget_bytes` in all.

    Used by the scheduler's worker thread only (no lock). A prefix is taken out while its
    session's turn runs and put back, extended, when the turn ends; a second concurrent turn of
    the same session simply prefills in full.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[str, KeptPrefix] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, session: str) -> bool:
        return session in self._kept

    def peek(self, session: str) -> KeptPrefix | None:
        return self._kept.get(session)

    def take(self, session: str, prompt_ids: list[int]) -> KeptPrefix | None:
        """Remove the session's prefix and return what `prompt_ids` can reuse of it (None when
        nothing): what no longer matches the prompt is dropped."""
        kept = self._kept.pop(session, None)
        if kept is None:
            return None
        self.nbytes -= kept.nbytes
        length = reusable_length(kept.ids, prompt_ids)
        return kept.truncated(length) if length > 0 else None

    def put(self, session: str, prefix: KeptPrefix) -> None:
        """Keep `prefix` for `session` (replacing its previous one), evicting the least recently
        used prefixes beyond the budget; a prefix larger than the whole budget is not kept."""
        old = self._kept.pop(session, None)
        if old is not None:
            self.nbytes -= old.nbytes
        size = prefix.nbytes
        if size > self.budget_bytes or not prefix.ids:
            return
        while self._kept and self.nbytes + size > self.budget_bytes:
            _, evicted = self._kept.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1
        self._kept[session] = prefix
        self.nbytes += size

    def drop(self, session: str) -> None:
        old = self._kept.pop(session, None)
        if old is not None:
            self.nbytes -= old.nbytes


def cut_row(cache: Any, mask: torch.Tensor, row: int, ids: list[int]) -> KeptPrefix:
    """A copy of row `row` of a left-padded batch cache without its padding columns; `ids` are
    that row's tokens, in order (as many as the row has real columns)."""
    real = torch.nonzero(mask[row]).flatten()
    if len(ids) != len(real):
        raise ValueError(f"{len(ids)} token ids for a row of {len(real)} cached tokens")
    layers = [
        (
            layer.keys[row : row + 1].index_select(2, real),
            layer.values[row : row + 1].index_select(2, real),
        )
        for layer in cache.layers
    ]
    return KeptPrefix(list(ids), layers)


def group_cache(
    cache: Any, prefixes: list[KeptPrefix | None], device: str
) -> tuple[Any, torch.Tensor | None]:
    """Fill the empty `cache` of a prefill group with its rows' reused prefixes, left-padded to
    the longest (a row without one is all padding); returns the cache and its mask (1 = real
    token), None when no row reuses anything."""
    longest = max((len(p.ids) for p in prefixes if p is not None), default=0)
    if longest == 0:
        return cache, None
    sample = next(p for p in prefixes if p is not None)
    for index, (k0, v0) in enumerate(sample.layers):
        keys, values = [], []
        for prefix in prefixes:
            n = len(prefix.ids) if prefix is not None else 0
            pad_k = k0.new_zeros(1, k0.shape[1], longest - n, k0.shape[3])
            pad_v = v0.new_zeros(1, v0.shape[1], longest - n, v0.shape[3])
            k, v = (
                prefix.layers[index] if prefix is not None else (pad_k[:, :, :0], pad_v[:, :, :0])
            )
            keys.append(torch.cat([pad_k, k], dim=2))
            values.append(torch.cat([pad_v, v], dim=2))
        cache.update(torch.cat(keys).to(device), torch.cat(values).to(device), index)
    mask = torch.tensor(
        [
            [0] * (longest - (len(p.ids) if p else 0)) + [1] * (len(p.ids) if p else 0)
            for p in prefixes
        ],
        device=device,
    )
    return cache, mask


def take_prefix(prefixes: PrefixCache | None, request: Any, ids: list[int]) -> KeptPrefix | None:
    """The KV prefix `request`'s session kept that its prompt `ids` reuses (None if none); sets
    `request.reused`."""
    if prefixes is None or request.session is None:
        return None
    kept = prefixes.take(request.session, ids)
    request.reused = len(kept.ids) if kept is not None else 0
    return kept


def keep_prefixes(prefixes: PrefixCache | None, batch: Any, rows: list[int]) -> None:
    """Before `rows` leave the batch (a `kv_cache.BatchCache`): keep the KV of those whose
    request has a session, under that session."""
    if prefixes is None:
        return
    for row in rows:
        request = batch.rows[row]
        if request.session is None or request.detokenizer is None:
            continue
        real = int(batch.mask[row].sum())
        # Every token fed so far, the answer's included (the last one sampled never is).
        ids = (request.prompt_ids + request.detokenizer.ids)[:real]
        try:
            prefixes.put(request.session, cut_row(batch.cache, batch.mask, row, ids))
        except ValueError:  # should not happen; a lost prefix only costs a full prefill
            logger.exception("could not keep the KV prefix of session %s", request.session)
