"""A request as the batch scheduler keeps it, the events it streams, and the group of prompts
that are prefilled together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.config import GenerationParams
from serve_app.engines.chat_tokens import prompt_token_ids
from serve_app.engines.detokenizer import IncrementalDetokenizer
from serve_app.engines.logits_processing import RowControls
from serve_app.engines.sampling import seeded_generator
from serve_app.model_contract import (
    AnswerChunk,
    FinishReason,
    GenerationRequest,
    ModelInput,
    TokenLogprob,
)

# Why a generation ended (`sampling.stop_reason`; "grammar": its output constraint's value is
# complete) as the contract's finish reason.
FINISH_REASONS: dict[str, FinishReason] = {
    "eos": "stop",
    "grammar": "stop",
    "length": "length",
    "context": "length",
}


@dataclass
class StreamEnd:
    """The last event of a request: `error` is None when it finished normally (its last
    `AnswerChunk`, with the finish reason, came just before)."""

    reason: str
    error: str | None = None


Event = AnswerChunk | StreamEnd


@dataclass(eq=False)
class Request:
    prompt: ModelInput
    params: GenerationParams
    seed: int | None = None
    consumer: Any = None  # where its events go; opaque here, read by the `deliver` callback
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: str | None = None  # the key of its kept KV prefix (engines/prefix_cache.py)
    # The contract's request, for its logits controls (None: plain sampling).
    spec: GenerationRequest | None = None
    # Filled in by the worker:
    prompt_len: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens whose KV came from the session's kept prefix
    max_new_tokens: int = 0
    generated: int = 0
    last_token: int = 0
    emitted: int = 0  # of the detokenizer's ids, those already sent in a chunk
    detokenizer: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None  # its own, when it has a seed
    controls: RowControls | None = None  # logits controls, when `spec` asks for any
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per detokenizer id

    def start(self, tokenizer: Any, context_length: int, device: str) -> list[int]:
        """Ready the request for its prefill; returns its prompt's token ids. ValueError when
        the prompt cannot run (the message fails this request only)."""
        try:
            ids = (
                list(self.prompt)  # token ids from the ingress (engines/chat_tokens.py)
                if isinstance(self.prompt, list)
                else prompt_token_ids(tokenizer, self.prompt)
            )
        except Exception as exc:
            raise ValueError(f"tokenization failed: {exc!r}") from exc
        if len(ids) >= context_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the context of {context_length}"
            )
        self.prompt_len = len(ids)
        self.prompt_ids = ids
        self.max_new_tokens = self.params.max_new_tokens
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.generator = seeded_generator(self.seed, device)
        return ids

    def chunk(self, text: str, finish_reason: FinishReason | None = None) -> AnswerChunk:
        """`text` with the token ids generated since the last chunk (the detokenizer may have
        held back the text of some of them until now)."""
        ids = self.detokenizer.ids
        new_ids = tuple(ids[self.emitted :])
        logprobs = tuple(self.token_logprobs[self.emitted :])
        self.emitted = len(ids)
        return AnswerChunk(text, len(new_ids), new_ids, finish_reason, logprobs)


Deliver = Callable[[list[tuple[Request, Event]]], None]


# Prompt tokens per request per prefill pass. Measured on the 2-core CPU with the 135M model in
# bfloat16: a batch-8 decode step took 68 ms, a 64-token prefill 95 ms, 128 tokens 127 ms, 256
# tokens 205 ms. So a decoding stream waits about one step's worth of prefill per newcomer in
# the group between two of its tokens, however long the prompts; and a burst of short prompts
# (8 x ~35 tokens) still goes through in one pass, which is what keeps its first tokens early.
PREFILL_CHUNK_TOKENS = 64


@dataclass(eq=False)
class PrefillGroup:
    """Requests admitted together, their prompts left-padded to one width and run through the
    model a chunk of columns at a time (between decode steps) into their own KV cache.

    The cache may start with `prefix` columns already filled (the rows' reused KV prefixes,
    left-padded); `mask` covers those columns and then the prompts' columns."""

    requests: list[Request]
    input_ids: torch.Tensor  # [rows, width]: the tokens still to run
    mask: torch.Tensor  # [rows, prefix + width], 1 = real token
    padded: bool
    cache: Any
    done: int = 0  # columns of `input_ids` already run through the model
    prefix: int = 0  # columns of the cache filled before the first chunk

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @classmethod
    def left_padded(
        cls,
        ready: list[tuple[Request, list[int]]],
        pad_id: int,
        device: str,
        cache: Any,
        prefix_mask: torch.Tensor | None = None,
    ) -> PrefillGroup:
        """The group of `ready` (request, ids still to run) pairs, left-padded to the longest,
        after the `prefix_mask` columns already in `cache` (if any)."""
        width = max(len(ids) for _, ids in ready)
        mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for _, ids in ready], device=device
        )
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask, mask], dim=1)
        return cls(
            requests=[r for r, _ in ready],
            input_ids=torch.tensor(
                [[pad_id] * (width - len(ids)) + ids for _, ids in ready], device=device
            ),
            mask=mask,
            padded=not bool(mask.all()),
            cache=cache,
            prefix=0 if prefix_mask is None else prefix_mask.shape[1],
        )
