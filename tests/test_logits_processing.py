"""Per-row logits controls (engines/logits_processing.py) and output grammars (engines/grammar.py)
on small hand-made logits: no model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from serve_app.config import GenerationParams
from serve_app.engines.grammar import (
    CHAR_EOS,
    char_compiler,
    char_text,
    char_token,
    constraint_error,
)
from serve_app.engines.logits_processing import (
    allowed_tokens_mask,
    apply_controls,
    controls_for,
    next_tokens,
)
from serve_app.model_contract import GenerationRequest, OutputConstraint

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=8)
VOCAB = 10
EOS = [9]


def spec(**fields) -> GenerationRequest:
    return GenerationRequest("prompt", GREEDY, **fields)


def row(controls, params: GenerationParams = GREEDY) -> SimpleNamespace:
    return SimpleNamespace(params=params, generator=None, controls=controls)


def controls(**fields):
    return controls_for(spec(**fields), VOCAB, "cpu", None)


def test_a_plain_request_has_no_controls_and_stays_on_the_cheap_path() -> None:
    assert controls() is None
    logits = torch.randn(3, VOCAB)
    tokens, scores = next_tokens(logits, [row(None)] * 3, EOS)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert scores is None


def test_logit_bias_moves_only_its_own_row() -> None:
    logits = torch.zeros(2, VOCAB)
    biased = controls(logit_bias=((3, 5.0), (4, -100.0)))
    out = apply_controls(logits, [biased, None], EOS)
    assert out[0, 3] == 5.0 and out[0, 4] == -100.0
    assert torch.equal(out[1], logits[1])
    assert torch.equal(logits, torch.zeros(2, VOCAB))  # the raw logits are left alone
    assert next_tokens(logits, [row(biased), row(None)], EOS)[0][0] == 3


def test_logit_bias_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="logit_bias token id 10"):
        controls(logit_bias=((10, 1.0),))


def test_min_tokens_masks_eos_until_reached_and_ignore_eos_always() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 9] = 10.0  # EOS is by far the likeliest
    at_least_two, ignoring = controls(min_tokens=2), controls(ignore_eos=True)
    rows = [row(at_least_two), row(ignoring)]
    for _ in range(2):
        tokens, _ = next_tokens(logits, rows, EOS)
        assert 9 not in tokens
        at_least_two.observe(tokens[0], False)
        ignoring.observe(tokens[1], False)
    tokens, _ = next_tokens(logits, rows, EOS)
    assert tokens == [9, 0]


def test_penalties_follow_openais_definition_on_generated_tokens() -> None:
    c = controls(presence_penalty=0.5, frequency_penalty=0.25)
    for token in (2, 2, 2, 5):
        c.observe(token, False)
    out = apply_controls(torch.zeros(1, VOCAB), [c], EOS)[0]
    assert out[2] == pytest.approx(-(3 * 0.25 + 0.5))
    assert out[5] == pytest.approx(-(1 * 0.25 + 0.5))
    assert out[0] == 0.0
    # A negative penalty favours repetition.
    favour = controls(frequency_penalty=-2.0)
    favour.observe(7, False)
    assert next_tokens(torch.zeros(1, VOCAB), [row(favour)], EOS)[0] == [7]


def test_logprobs_are_the_raw_models_chosen_and_top_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0, 0, 0, 0, 0, 0]] * 2)
    # Row 0 is biased to token 0; its log probabilities are still the raw model's.
    c0 = controls(logprobs=2, logit_bias=((0, 100.0),))
    c1 = controls(logprobs=0)
    tokens, scores = next_tokens(logits, [row(c0), row(c1)], EOS)
    raw = torch.log_softmax(logits[0], dim=-1)
    assert tokens == [0, 3]
    assert scores[0].logprob == pytest.approx(float(raw[0]))
    assert [t for t, _ in scores[0].top] == [3, 2]
    assert scores[0].top[0][1] == pytest.approx(float(raw[3]))
    assert scores[1].top == () and scores[1].logprob == pytest.approx(float(raw[3]))
    assert all(math.isfinite(lp) for _, lp in scores[0].top)
    entry = scores[0].as_token_logprob(0, lambda t: f"<{t}>")
    assert entry.token == "<0>" and [t.token for t in entry.top] == ["<3>", "<2>"]


def test_a_seeded_sampled_row_with_controls_is_reproducible() -> None:
    sampled = GenerationParams(temperature=1.0, max_new_tokens=8)
    logits = torch.zeros(1, VOCAB)

    def draw() -> list:
        gen = torch.Generator().manual_seed(5)
        c = controls(presence_penalty=0.1)
        r = SimpleNamespace(params=sampled, generator=gen, controls=c)
        out = []
        for _ in range(6):
            token = next_tokens(logits, [r], EOS)[0][0]
            c.observe(token, False)
            out.append(token)
        return out

    assert draw() == draw()


# --- grammars ----------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def test_constraint_error_names_the_problem_of_a_schema() -> None:
    assert constraint_error(OutputConstraint("json_object")) is None
    assert constraint_error(OutputConstraint("json_schema", json.dumps(SCHEMA))) is None
    bad_type = json.dumps({"type": "object", "properties": {"a": {"type": "foo"}}})
    assert "foo" in constraint_error(OutputConstraint("json_schema", bad_type))
    assert "not valid JSON" in constraint_error(OutputConstraint("json_schema", "{nope"))
    assert "JSON object" in constraint_error(OutputConstraint("json_schema", "[1]"))


def test_the_grammar_mask_allows_only_what_the_schema_can_continue_with() -> None:
    compiler = char_compiler()
    matcher = compiler.matcher(OutputConstraint("json_schema", json.dumps(SCHEMA)))
    vocab = compiler.tokenizer.vocab_size
    allowed = allowed_tokens_mask([matcher], vocab)[0]
    assert allowed.nonzero().flatten().tolist() == [char_token("{")]
    for char in '{"ok": ':
        matcher.advance(char_token(char))
    allowed = allowed_tokens_mask([matcher], vocab)[0]
    assert {char_text(t) for t in allowed.nonzero().flatten().tolist()} == {"t", "f"}
    for char in "true}":
        matcher.advance(char_token(char))
    assert matcher.done
    assert allowed_tokens_mask([matcher], vocab)[0].nonzero().flatten().tolist() == [CHAR_EOS]
    with pytest.raises(ValueError, match="rejected"):
        compiler.matcher(OutputConstraint("json_object")).advance(char_token("x"))


def test_a_grammar_row_is_masked_beside_an_unconstrained_one() -> None:
    compiler = char_compiler()
    vocab = compiler.tokenizer.vocab_size
    grammar = compiler.matcher(OutputConstraint("json_object"))
    constrained = controls_for(spec(), vocab, "cpu", grammar)
    logits = torch.zeros(2, vocab)
    logits[:, char_token("x")] = 5.0
    tokens, _ = next_tokens(logits, [row(constrained), row(None)], [CHAR_EOS])
    assert tokens == [char_token("{"), char_token("x")]
