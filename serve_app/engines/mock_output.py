"""What the mock engine says for OpenAI's controls, as pure functions of the request.

- `ignore_eos` / `min_tokens`: the mock's answer is a list of words; an answer that would end
  by itself (echo mode) goes on repeating its words, to the budget or to `min_tokens`.
- `logprobs`: the mock is deterministic, so each word it says has probability 1: log
  probability 0.0, and the only candidate with a non-zero probability is the word itself (the
  top list holds just that one; OpenAI allows fewer than `top_logprobs` entries). Token ids are
  -1: the mock has no vocabulary of ids.
- `json_object` / `json_schema`: the answer is decoded by the same llguidance matcher as the
  transformers engine's, over a vocabulary of single printable characters (one character, one
  token): at every step it takes the next character of its usual answer text while that is
  allowed (at most `FILL_RUN` in a row, so strings stay short), else the first allowed one of
  `PREFERENCE` (closing quotes and brackets first, so values end soon). The text is therefore
  valid for the schema because the grammar allowed nothing else; a budget that ends first
  cuts it (finish reason `length`), as with a real model.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable, Iterator

from serve_app.engines.grammar import CHAR_EOS, char_compiler, char_text, char_token
from serve_app.model_contract import FinishReason, OutputConstraint, TokenLogprob, TopLogprob

FILL_RUN = 12
PREFERENCE = '"}],' + string.digits + string.ascii_lowercase + string.printable
MOCK_TOKEN_ID = -1


def repeat_words(tokens: list[str]) -> Iterator[str]:
    """Tokens over and over, with a space between the repetitions."""
    yield from tokens
    spaced = [tokens[0] if tokens[0][:1].isspace() else " " + tokens[0], *tokens[1:]]
    while True:
        yield from spaced


def answer_words(
    words: Iterable[str], limit: int, ignore_eos: bool = False, min_tokens: int = 0
) -> tuple[list[str], FinishReason]:
    """The answer `words` (possibly endless) cut at `limit`, and its finish reason. An answer
    that ends by itself before `min_tokens` (or at all, with `ignore_eos`) goes on repeating
    its words, as a model kept from stopping would go on talking."""
    taken = list(itertools.islice(words, limit + 1))
    if taken and len(taken) <= limit and (ignore_eos or min_tokens > len(taken)):
        target = limit + 1 if ignore_eos else min(min_tokens, limit + 1)
        taken = list(itertools.islice(repeat_words(taken), target))
    if len(taken) > limit:
        return taken[:limit], "length"
    return taken, "stop"


def constrained_text(
    constraint: OutputConstraint, filler: str, limit: int
) -> tuple[list[str], FinishReason]:
    """Characters of a value valid under `constraint` (at most `limit`), and the finish reason.
    ValueError if the constraint cannot compile."""
    matcher = char_compiler().matcher(constraint)
    fill = filler or " "
    position, run = 0, 0
    out: list[str] = []
    while not matcher.done:
        bits = matcher.allowed()
        allowed = {i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1}
        if CHAR_EOS in allowed and matcher.accepting:
            break
        if len(out) == limit:
            return out, "length"
        wanted = char_token(fill[position % len(fill)])
        if run < FILL_RUN and wanted in allowed:
            token, run, position = wanted, run + 1, position + 1
        else:
            token = next(char_token(c) for c in PREFERENCE if char_token(c) in allowed)
            run = 0
        matcher.advance(token)
        out.append(char_text(token))
    return out, "stop"


def mock_logprob(token: str, top: int) -> TokenLogprob:
    """A deterministic token's log probability (0.0), with itself as its only candidate."""
    candidates = (TopLogprob(MOCK_TOKEN_ID, token, 0.0),) if top else ()
    return TokenLogprob(MOCK_TOKEN_ID, token, 0.0, candidates)
