"""Log probabilities in OpenAI's two formats, as pure functions of the engine's `TokenLogprob`s
(serve_app/model_contract.py).

* Chat (`choices[i].logprobs`): `{"content": [{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}], "refusal": null}`; `bytes` are the token's UTF-8 bytes, so that a client
  can rebuild characters split across tokens.
* Legacy completions (`logprobs: k`): `{tokens, token_logprobs, top_logprobs: [{token:
  logprob}], text_offset}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.model_contract import TokenLogprob

# OpenAI reports -9999.0 for a probability that underflows; JSON has no -Infinity.
FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if logprob > FLOOR else FLOOR


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """One choice's (or one chunk's) `logprobs` object."""
    return {
        "content": [
            {
                **_entry(e.token, e.logprob),
                "top_logprobs": [_entry(t.token, t.logprob) for t in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """The legacy `logprobs` object; `text_offset`: where the first token starts in the
    choice's text (after an echoed prompt, its length)."""
    offsets, position = [], text_offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [{t.token: _finite(t.logprob) for t in e.top} for e in entries],
        "text_offset": offsets,
    }
