"""OpenAI's sampling fields, as pure functions: a body's `n`, `ignore_eos`, `min_tokens`,
penalties, `logit_bias`, `logprobs`/`top_logprobs` and `response_format` become one `Sampling`,
whose `generation_fields()` are the matching `GenerationRequest` fields
(serve_app/model_contract.py). Ranges follow OpenAI's reference; each limit is defined here once.

Whether the engine honours a field is not decided here: the service asks
`engines.features.unsupported_features` before the request takes a slot.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema import SchemaError, validators

from serve_app.engines.features import unsupported_features
from serve_app.model_contract import GenerationRequest, OutputConstraint
from serve_app.openai_api.body import strict_bool
from serve_app.refusals import invalid_request, unsupported_parameter

MAX_CHOICES = 8  # `n`: each choice is a model stream; one request must not take the whole pool
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' `logprobs` (OpenAI's bound)
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty / frequency_penalty (OpenAI)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOKEN_ID = 2**31 - 1  # the engine checks it against its vocabulary
MAX_MIN_TOKENS = 1 << 20  # the context check caps it far lower (min_tokens <= the budget)
MAX_SCHEMA_CHARS = 64_000  # a JSON schema, serialized
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of one request, defaults meaning "not asked for"."""

    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    constraint: OutputConstraint | None = None

    def generation_fields(self) -> dict[str, Any]:
        """The `GenerationRequest` keyword arguments (every field but `n`)."""
        return {
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias,
            "logprobs": self.logprobs,
            "constraint": self.constraint,
        }


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: `seed + index` (wrapping in 64 bits), so that `n` seeded choices
    differ and each is reproducible."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


def choice_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The generations of a request's `n` choices: the same but for the seed (`choice_seed`),
    so that a seeded request is reproducible choice by choice. Greedy decoding gives n equal
    answers, as vLLM's server does."""
    if n == 1:
        return [request]
    return [dataclasses.replace(request, seed=choice_seed(request.seed, i)) for i in range(n)]


def strict_int(data: Mapping[str, Any], key: str, low: int, high: int, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise invalid_request(f"'{key}' must be an integer", key, "invalid_type")
    if not low <= value <= high:
        raise invalid_request(f"'{key}' must be between {low} and {high} (got {value})", key)
    return value


def _strict_number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(f"'{param}' must be a number", param, "invalid_type")
    if not low <= value <= high:
        raise invalid_request(
            f"'{param}' must be between {low:g} and {high:g} (got {value})", param
        )
    return float(value)


def parse_logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    """`{"<token id>": bias}` -> sorted `(token_id, bias)` pairs; a zero bias is dropped."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise invalid_request("'logit_bias' must be an object", "logit_bias", "invalid_type")
    if len(raw) > MAX_LOGIT_BIAS_ENTRIES:
        raise invalid_request(
            f"'logit_bias' has more than {MAX_LOGIT_BIAS_ENTRIES} entries", "logit_bias"
        )
    pairs = []
    for key, bias in raw.items():
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_TOKEN_ID:
            raise invalid_request(
                f"'logit_bias' keys must be token ids (got {key[:32]!r})", "logit_bias"
            )
        value = _strict_number(bias, f"logit_bias.{int(key)}", *LOGIT_BIAS_RANGE)
        if value:
            pairs.append((int(key), value))
    return tuple(sorted(pairs))


def parse_logprobs(data: Mapping[str, Any]) -> int | None:
    """`logprobs: true` (+ `top_logprobs`) -> the contract's count; `top_logprobs` alone is a
    400, as at OpenAI."""
    wanted = strict_bool(data, "logprobs", "logprobs")
    top = strict_int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if top and not wanted:
        raise invalid_request(
            "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value"
        )
    return top if wanted else None


def parse_legacy_logprobs(data: Mapping[str, Any]) -> int | None:
    """`/v1/completions`' `logprobs: k`: the chosen token's and the k most likely (None: none)."""
    if data.get("logprobs") is None:
        return None
    return strict_int(data, "logprobs", 0, MAX_LEGACY_LOGPROBS, 0)


def check_json_schema(schema: Any, param: str) -> str:
    """`schema` if it is a valid JSON schema (its own metaschema's rules), serialized."""
    if not isinstance(schema, dict):
        raise invalid_request(f"'{param}' must be a JSON schema object", param, "invalid_type")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise invalid_request(
            f"'{param}' is not a valid JSON schema: {exc.message[:200]}", param, "invalid_schema"
        ) from None
    text = json.dumps(schema, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise invalid_request(f"'{param}' is longer than {MAX_SCHEMA_CHARS} characters", param)
    return text


def parse_response_format(raw: Any) -> OutputConstraint | None:
    """`response_format` -> an output constraint (None for `text`). `strict` is accepted either
    way: the answer is always decoded under the schema."""
    if raw is None:
        return None
    where = "response_format"
    if not isinstance(raw, dict):
        raise invalid_request(f"'{where}' must be an object", where, "invalid_type")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint("json_object")
    if kind != "json_schema":
        raise invalid_request(
            f"'{where}.type' must be 'text', 'json_object' or 'json_schema'", f"{where}.type"
        )
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid_request(
            f"'{where}.json_schema' must be an object", f"{where}.json_schema", "invalid_type"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise invalid_request(
            f"'{where}.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
            f"{where}.json_schema.name",
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_request(
            f"'{where}.json_schema.description' must be a string",
            f"{where}.json_schema.description",
            "invalid_type",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(
            f"'{where}.json_schema.strict' must be a boolean",
            f"{where}.json_schema.strict",
            "invalid_type",
        )
    schema = spec.get("schema")
    if schema is None:  # OpenAI: an absent schema is "any JSON object"
        return OutputConstraint("json_object")
    return OutputConstraint("json_schema", check_json_schema(schema, f"{where}.json_schema.schema"))


def parse_sampling(
    data: Mapping[str, Any], *, max_tokens: int | None = None, legacy: bool = False
) -> Sampling:
    """The sampling fields of a body; `max_tokens`: the explicit budget, which `min_tokens` may
    not exceed. `legacy`: `/v1/completions`, whose `logprobs` is a count (0-5) and which has no
    `response_format`."""
    min_tokens = strict_int(data, "min_tokens", 0, MAX_MIN_TOKENS, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid_request(
            f"'min_tokens' ({min_tokens}) is more than the token budget ({max_tokens})",
            "min_tokens",
        )
    penalties = {
        key: _strict_number(data[key], key, *PENALTY_RANGE) if data.get(key) is not None else 0.0
        for key in ("presence_penalty", "frequency_penalty")
    }
    return Sampling(
        n=strict_int(data, "n", 1, MAX_CHOICES, 1),
        ignore_eos=strict_bool(data, "ignore_eos", "ignore_eos"),
        min_tokens=min_tokens,
        logit_bias=parse_logit_bias(data.get("logit_bias")),
        logprobs=parse_legacy_logprobs(data) if legacy else parse_logprobs(data),
        constraint=None if legacy else parse_response_format(data.get("response_format")),
        **penalties,
    )


# The request field that asked for each engine feature (engines/features.py), for the 400.
_FEATURE_FIELDS = {
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
    "penalties": "presence_penalty",
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
    "json_object": "response_format",
    "json_schema": "response_format",
}


def check_engine(engine: str, request: GenerationRequest, param: str | None = None) -> None:
    """A 400 naming the engine and the field when `engine` cannot honour what `request` asks
    (before it takes a slot: no field is silently ignored). `param`: the field that asked, where
    it is not the feature's own (a forced tool call's constraint is `tool_choice`'s)."""
    missing = unsupported_features(engine, request)
    if not missing:
        return
    feature = missing[0]
    if param is None:
        param = _FEATURE_FIELDS[feature]
        if feature == "penalties" and not request.presence_penalty:
            param = "frequency_penalty"
    raise unsupported_parameter(
        param, f"({feature}) is not supported by the {engine} engine this server runs"
    )
