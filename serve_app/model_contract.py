"""The one typed contract between the ingress and the model deployment.

The ingress calls `ChatModel.generate(GenerationRequest)` through a streaming DeploymentHandle.
The stream yields, in order:

1. one `SlotAcquired`: the request now holds a generation slot (the ingress's wait is over);
   it carries the prompt's token count as the engine sees it;
2. `AnswerChunk`s: each a text delta with the tokens it covers; the last one carries the
   `finish_reason` the engine decided (`stop`: an end-of-sequence token or a stop string;
   `length`: the token budget or the context ran out; `abort`: the engine gave up on it).

With `GenerationRequest.logprobs` set, every chunk also carries one `TokenLogprob` per token.

One model call generates one answer (`AnswerChunk.index` 0). An OpenAI request with `n` choices
is n model calls, each holding a slot, that the ingress merges into one stream whose chunks
carry their choice's `index` (serve_app/choices.py).

Usage and `finish_reason` come from here, never from re-tokenizing text in the ingress. Stop
strings are matched on the model side, so the text never runs past them. This module imports
only pydantic-level code: the ingress and the engines both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from serve_app.config import GenerationParams

# A prompt as an engine takes it: rendered text (engines without a tokenizer) or token ids in
# which message contents can never be control tokens (see engines/chat_tokens.py).
ModelInput = str | list[int]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """Decode only text of this shape: any JSON object (`json_object`), or JSON valid against
    `schema_json` (`json_schema`; a tool call under `tool_choice: required` is one). The schema
    travels serialized so that the request stays hashable and cheap to send through Ray."""

    kind: Literal["json_object", "json_schema"]
    schema_json: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the ingress asks of the model: a prompt, validated parameters, stop strings, and
    optionally a seed: the same seed and prompt sample the same answer, alone or in a batch.

    The fields after `seed` are OpenAI's sampling controls; their defaults change nothing, and an
    engine that cannot honour a non-default one is never sent it (engines/features.py).
    `session` names the conversation the request continues: the key of session-affine routing
    and of an engine's kept KV cache (None: a one-off request).
    """

    prompt: ModelInput
    params: GenerationParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no log probabilities; 0: the chosen token's; k: also the k most likely tokens.
    logprobs: int | None = None
    constraint: OutputConstraint | None = None
    session: str | None = None


@dataclass(frozen=True, slots=True)
class SlotAcquired:
    """First item of every stream: a generation slot is taken."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One candidate token at a position: its id, its text alone, its log probability."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The chosen token at a position, with the `GenerationRequest.logprobs` most likely ones."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class AnswerChunk:
    """A piece of the answer. `token_ids` is empty for engines without real token ids (the
    mock); `num_tokens` always counts the tokens this chunk covers; `logprobs` has one entry per
    token when the request asked for them, else none. `index`: the choice it belongs to (set
    by the ingress when one request has several; the model always sends 0)."""

    text: str
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0


ModelItem = SlotAcquired | AnswerChunk


def merge_chunks(chunks: Sequence[AnswerChunk]) -> AnswerChunk:
    """Several consecutive chunks as one (the last one's finish reason, if any)."""
    if len(chunks) == 1:
        return chunks[0]
    return AnswerChunk(
        text="".join(c.text for c in chunks),
        num_tokens=sum(c.num_tokens for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        finish_reason=chunks[-1].finish_reason,
        logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        index=chunks[-1].index,
    )
