"""The one typed contract between the ingress and the model deployment.

The ingress calls `ChatModel.generate(GenerationRequest)` through a streaming DeploymentHandle.
The stream yields, in order:

1. one `SlotAcquired`: the request now holds a generation slot (the ingress's wait is over);
   it carries the prompt's token count as the engine sees it;
2. `AnswerChunk`s: each a text delta with the tokens it covers; the last one carries the
   `finish_reason` the engine decided (`stop`: an end-of-sequence token or a stop string;
   `length`: the token budget or the context ran out; `abort`: the engine gave up on it).

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
class GenerationRequest:
    """What the ingress asks of the model: a prompt, validated parameters, stop strings, and
    optionally a seed: the same seed and prompt sample the same answer, alone or in a batch."""

    prompt: ModelInput
    params: GenerationParams
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class SlotAcquired:
    """First item of every stream: a generation slot is taken."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class AnswerChunk:
    """A piece of the answer. `token_ids` is empty for engines without real token ids (the
    mock); `num_tokens` always counts the tokens this chunk covers."""

    text: str
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None


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
    )
