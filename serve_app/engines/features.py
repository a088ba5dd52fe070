"""What each engine honours beyond the basics (temperature, top-k, top-p, the token budget, stop
strings, seed): the one table the ingress checks before a request takes a slot, so that a field
an engine cannot honour gets a 400 naming the engine instead of being silently ignored.

Pure: no engine is imported here (the ingress holds no weights).
"""

from __future__ import annotations

from typing import Literal, get_args

from serve_app.model_contract import GenerationRequest

Feature = Literal[
    "ignore_eos",
    "min_tokens",
    "penalties",
    "logit_bias",
    "logprobs",
    "json_object",
    "json_schema",
]

ALL_FEATURES: frozenset[Feature] = frozenset(get_args(Feature))

# Filled in as each engine learns a feature; a feature missing here is refused for that engine.
ENGINE_FEATURES: dict[str, frozenset[Feature]] = {
    # logits_processing.py, grammar.py; tests/test_engine_controls.py
    "transformers": ALL_FEATURES,
    # mock_output.py; tests/test_mock_controls.py (it has no logits to penalise or bias)
    "mock": frozenset({"ignore_eos", "min_tokens", "logprobs", "json_object", "json_schema"}),
    # Each honoured through vLLM's own SamplingParams / structured outputs
    # (engines/vllm_options.py; tests/test_vllm_engine.py shows each taking effect).
    "vllm": ALL_FEATURES,
}


def features_needed(request: GenerationRequest) -> list[Feature]:
    """The features `request` uses (its non-default sampling controls), in a stable order."""
    needed: list[Feature] = []
    if request.ignore_eos:
        needed.append("ignore_eos")
    if request.min_tokens:
        needed.append("min_tokens")
    if request.presence_penalty or request.frequency_penalty:
        needed.append("penalties")
    if request.logit_bias:
        needed.append("logit_bias")
    if request.logprobs is not None:
        needed.append("logprobs")
    if request.constraint is not None:
        needed.append(request.constraint.kind)
    return needed


def unsupported_features(engine: str, request: GenerationRequest) -> list[Feature]:
    """The features `request` needs that `engine` does not honour (empty: it can be served)."""
    supported = ENGINE_FEATURES.get(engine, frozenset())
    return [feature for feature in features_needed(request) if feature not in supported]
