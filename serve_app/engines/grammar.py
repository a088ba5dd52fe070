"""Structured outputs with llguidance: an `OutputConstraint` as a grammar, and one matcher per
request that says which tokens may come next and advances with each accepted token.

Why llguidance (not xgrammar): both install beside torch 2.13.0+cpu here, but xgrammar pulls
triton and apache-tvm-ffi (hundreds of MB, of no use on CPU) while llguidance is one 3 MB wheel
with no dependencies; it computes a mask over a 49k vocabulary in well under a millisecond on
this CPU without precompiling the grammar per vocabulary, and vLLM uses it too (its `guidance`
backend). No torch here: the ingress may use `constraint_error` to refuse a bad schema with a
400 before it takes a slot, and the mock engine uses the matcher over its own small vocabulary.

The JSON is compact, with fixed separators (`", "`, `": "`) and no free whitespace: a small
model left free to add whitespace can loop on newlines until its budget runs out.

Ends: the answer ends (finish reason `stop`) as soon as the value is complete, or when the model
picks end-of-sequence where the grammar allows it. The grammar bounds what is said, not how
long: a string without `maxLength`, an array without `maxItems` (and any `json_object`) may go
on until the token budget runs out; the answer then ends with finish reason `length` and its
text is a prefix of a valid value, not parseable JSON (OpenAI and vLLM behave the same). A
schema whose strings, arrays and numbers are all bounded always completes within a budget
larger than its longest value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import llguidance
import llguidance.hf
from llguidance import LLMatcher, LLTokenizer

from serve_app.model_contract import OutputConstraint

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@lru_cache(maxsize=256)
def constraint_grammar(constraint: OutputConstraint) -> str:
    """The llguidance grammar of `constraint`. ValueError for a schema that is not JSON."""
    if constraint.kind == "json_object":
        schema: Any = {"type": "object"}
    else:
        try:
            schema = json.loads(constraint.schema_json or "")
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be a JSON object")
    return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def constraint_error(constraint: OutputConstraint) -> str | None:
    """Why `constraint` cannot be enforced (e.g. an unknown type or format in its schema), or
    None when it can. Needs no tokenizer: the ingress can answer 400 with this message."""
    try:
        grammar = constraint_grammar(constraint)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return LLMatcher.validate_grammar(grammar) or None


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: LLMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        """Write the allowed-next-token bitmask (bit t%32 of int32 word t//32) at `address`."""
        self._matcher.unsafe_compute_mask_ptr(address, num_bytes)

    def allowed(self) -> bytes:
        """The allowed-next-token bitmask as bytes (little-endian: token t is bit t%8 of byte
        t//8)."""
        return self._matcher.compute_bitmask()

    def advance(self, token: int) -> None:
        """Consume an accepted token. ValueError if the grammar did not allow it."""
        if not self._matcher.consume_token(token):
            raise ValueError(f"the output grammar rejected token {token}: {self.error()}")

    @property
    def done(self) -> bool:
        """The value is complete: nothing but the end of the answer may follow."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The answer may end here (it may also go on, e.g. more digits of a number)."""
        return self._matcher.is_accepting()

    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Matchers for constraints over one vocabulary (building it takes ~0.5 s: build once)."""

    def __init__(self, tokenizer: LLTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def for_hf_tokenizer(
        cls, hf_tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]
    ) -> GrammarCompiler:
        """Over a Hugging Face fast tokenizer; `vocab_size` is the model's logits width."""
        eos = sorted(eos_ids)
        return cls(llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos))

    def matcher(self, constraint: OutputConstraint) -> GrammarMatcher:
        """A fresh matcher at the start of `constraint`. ValueError if it cannot compile."""
        grammar = constraint_grammar(constraint)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the output constraint cannot be compiled: {matcher.get_error()}")
        return GrammarMatcher(matcher)


class _CharVocabulary:
    """A vocabulary of single printable ASCII characters after an end-of-text token (id 0), in
    the shape llguidance's `TokenizerWrapper` reads."""

    def __init__(self) -> None:
        self.tokens = [b"<|end|>"] + [bytes([c]) for c in range(32, 127)]
        self.eos_token_id = 0
        self.bos_token_id = None
        self.special_token_ids = [0]

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [ord(c) - 31 for c in text if 32 <= ord(c) < 127]


CHAR_EOS = 0


def char_token(char: str) -> int:
    """The id of a printable ASCII character in `char_compiler`'s vocabulary."""
    return ord(char) - 31


def char_text(token: int) -> str:
    return "" if token == CHAR_EOS else chr(token + 31)


@lru_cache(maxsize=1)
def char_compiler() -> GrammarCompiler:
    """Matchers over single printable ASCII characters (the mock engine's vocabulary)."""
    return GrammarCompiler(LLTokenizer(llguidance.TokenizerWrapper(_CharVocabulary())))
