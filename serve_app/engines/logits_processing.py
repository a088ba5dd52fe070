"""OpenAI's per-request logits controls inside a batched step: `ignore_eos`, `min_tokens`,
presence/frequency penalties, `logit_bias`, an output grammar's token mask, and the log
probabilities of the chosen token and the most likely ones.

A batch whose rows ask for none of these stays on the cheap path (`sample_tokens` on the raw
logits, no copy): one Python check per row per step. Otherwise the work is vectorised over the
rows that need it; only the grammar mask is computed row by row (by llguidance, in Rust).

Order, as vLLM's sampler does it: logit bias, end-of-sequence suppression, penalties, the
grammar mask, then temperature / top-k / top-p in `sample_tokens`. Log probabilities are those
of the raw model output (log softmax before any of the above), vLLM's default
(`logprobs_mode="raw_logprobs"`): they say what the model thought, not what the controls let
through.

`ignore_eos` masks the end-of-sequence tokens for the whole answer, as `min_tokens` does until
it is reached (vLLM's `ignore_eos` instead lets EOS be sampled and goes on after it; the
length is the same, without EOS text in the answer). Under an output grammar neither applies:
the grammar decides where the answer ends, and masking EOS there could leave no token at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from serve_app.engines.grammar import GrammarCompiler, GrammarMatcher
from serve_app.engines.sampling import SamplingRow, sample_tokens
from serve_app.model_contract import GenerationRequest, TokenLogprob, TopLogprob


@dataclass(eq=False)
class RowControls:
    """One request's logits controls and the state they need (tokens generated so far)."""

    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    grammar: GrammarMatcher | None = None
    generated: int = 0
    # How often each token id was generated (only with a penalty): [vocab] float32.
    counts: torch.Tensor | None = field(default=None, repr=False)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def suppresses_eos(self) -> bool:
        # A grammar decides the end itself: masking EOS could leave it no token at all.
        if self.grammar is not None:
            return False
        return self.ignore_eos or self.generated < self.min_tokens

    def observe(self, token: int, is_eos: bool) -> None:
        """Account for `token`, just accepted; the grammar advances past it (ValueError if it
        did not allow it). An end-of-sequence token ends the answer: the grammar needs no more.
        """
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.grammar is not None and not is_eos:
            self.grammar.advance(token)

    @property
    def complete(self) -> bool:
        """The grammar's value is complete: the answer ends here (finish reason `stop`)."""
        return self.grammar is not None and self.grammar.done


def controls_for(
    request: GenerationRequest, vocab_size: int, device: str, grammar: GrammarMatcher | None
) -> RowControls | None:
    """The controls `request` asks for (None: it asks for none, the cheap path). ValueError
    when a `logit_bias` token id is outside the model's vocabulary."""
    for token_id, _ in request.logit_bias:
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})"
            )
    controls = RowControls(
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=request.logit_bias,
        logprobs=request.logprobs,
        grammar=grammar,
    )
    asked = (
        controls.ignore_eos
        or controls.min_tokens
        or controls.penalised
        or controls.logit_bias
        or controls.logprobs is not None
        or grammar is not None
    )
    if not asked:
        return None
    if controls.penalised:
        controls.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    return controls


class ControlledRow(SamplingRow, Protocol):
    controls: RowControls | None


@dataclass(frozen=True, slots=True)
class RowScores:
    """The raw log probability of a row's chosen token and its `k` most likely tokens."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def as_token_logprob(self, token: int, text: Callable[[int], str]) -> TokenLogprob:
        return TokenLogprob(
            token,
            text(token),
            self.logprob,
            tuple(TopLogprob(t, text(t), lp) for t, lp in self.top),
        )


def allowed_tokens_mask(matchers: Sequence[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """[rows, vocab] booleans: the tokens each matcher allows next (computed on the CPU)."""
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask[row].data_ptr(), words * 4)
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(len(matchers), words * 32)[:, :vocab_size].bool()


def apply_controls(
    logits: torch.Tensor, controls: Sequence[RowControls | None], eos_ids: Sequence[int]
) -> torch.Tensor:
    """A float32 copy of `logits` [rows, vocab] with each row's controls applied."""
    out = logits.float().clone()
    device = out.device
    biased = [(i, c) for i, c in enumerate(controls) if c is not None and c.logit_bias]
    if biased:
        rows = [i for i, c in biased for _ in c.logit_bias]
        cols = [t for _, c in biased for t, _ in c.logit_bias]
        vals = [b for _, c in biased for _, b in c.logit_bias]
        out.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(vals, device=device, dtype=out.dtype),
            accumulate=True,
        )
    no_eos = [i for i, c in enumerate(controls) if c is not None and c.suppresses_eos()]
    if no_eos and eos_ids:
        rows_t = torch.tensor(no_eos, device=device)[:, None]
        out[rows_t, torch.tensor(list(eos_ids), device=device)[None, :]] = float("-inf")
    penalised = [(i, c) for i, c in enumerate(controls) if c is not None and c.penalised]
    if penalised:
        index = torch.tensor([i for i, _ in penalised], device=device)
        counts = torch.stack([c.counts for _, c in penalised])
        frequency = torch.tensor([c.frequency_penalty for _, c in penalised], device=device)
        presence = torch.tensor([c.presence_penalty for _, c in penalised], device=device)
        # OpenAI's definition, over the tokens generated so far (not the prompt).
        out[index] -= counts * frequency[:, None] + (counts > 0).float() * presence[:, None]
    grammared = [(i, c.grammar) for i, c in enumerate(controls) if c is not None and c.grammar]
    if grammared:
        index = torch.tensor([i for i, _ in grammared], device=device)
        allowed = allowed_tokens_mask([g for _, g in grammared], out.shape[-1]).to(device)
        out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


def row_scores(
    logits: torch.Tensor, tokens: Sequence[int | Exception], controls: Sequence[RowControls | None]
) -> list[RowScores | None]:
    """Raw log probabilities for the rows that asked for them (None elsewhere)."""
    wanted = [
        i
        for i, c in enumerate(controls)
        if c is not None and c.logprobs is not None and not isinstance(tokens[i], Exception)
    ]
    scores: list[RowScores | None] = [None] * len(controls)
    if not wanted:
        return scores
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    k = max(controls[i].logprobs for i in wanted)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, None][:, :0])
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for n, i in enumerate(wanted):
        k_i = controls[i].logprobs
        top = tuple(zip(top_ids[n][:k_i], top_lp[n][:k_i], strict=True))
        scores[i] = RowScores(chosen_lp[n], top)
    return scores


def next_tokens(
    logits: torch.Tensor, rows: Sequence[ControlledRow], eos_ids: Sequence[int]
) -> tuple[list[int | Exception], list[RowScores | None] | None]:
    """The next token of every row, and (when any row asked) their log probabilities."""
    controls = [row.controls for row in rows]
    if not any(controls):
        return sample_tokens(logits, rows), None
    tokens = sample_tokens(apply_controls(logits, controls, eos_ids), rows)
    return tokens, row_scores(logits, tokens, controls)


def token_text_cache(tokenizer: Any) -> Callable[[int], str]:
    """A token's text on its own (`decode([id])`, as vLLM reports it), memoised."""
    cache: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token])
        return cache[token]

    return text


class ControlsFactory:
    """Builds each request's `RowControls` against one model's vocabulary; its grammar
    compiler (a vocabulary index, ~0.5 s to build) is made on the first constrained request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], device: str):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self._grammars: GrammarCompiler | None = None

    def __call__(self, spec: GenerationRequest) -> RowControls | None:
        """ValueError when `spec` cannot run (a bad token id or schema): fails it alone."""
        grammar = None
        if spec.constraint is not None:
            if self._grammars is None:
                self._grammars = GrammarCompiler.for_hf_tokenizer(
                    self.tokenizer, self.vocab_size, self.eos_ids
                )
            grammar = self._grammars.matcher(spec.constraint)
        return controls_for(spec, self.vocab_size, self.device, grammar)
