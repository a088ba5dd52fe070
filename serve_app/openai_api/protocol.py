"""`/v1/chat/completions` requests: parsing and validation, as pure functions.

`parse_chat_completion` turns a body into a `ChatCompletionRequest`: plain `{role, content}`
messages, generation parameters named as in `serve_app.config.GenerationParams` (and validated
against that model's own ranges, so a limit has one definition), stop strings, `seed`,
`stream` and `include_usage`. A refusal is a `Refusal` in OpenAI's terms (400, or 404 for
another model).

* Unknown fields are accepted and ignored, as vLLM's server does: at the top level, inside
  messages and inside content parts (Open WebUI's `cache_control`). Their names come back in
  `ChatCompletionRequest.ignored` (the service lists them in a response header and counts them).
* Known fields that would change the answer but are not built (`tools` (until the tools work
  lands), `audio`, `modalities`, vLLM's `repetition_penalty`, `guided_json`...) are refused
  with a 400 naming them (`error.param`), unless their value is the neutral one (`tools: []`,
  `null` for anything...): clients that send explicit defaults, or that echo a previous
  assistant message back with `tool_calls: null`, keep working. Fields that cannot change the
  text (`user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`...) are accepted;
  `prompt_cache_key` (else `user`) keys session-affine routing and KV prefix reuse.
* The sampling fields (`n`, `seed`, `ignore_eos`, `min_tokens`, penalties, `logit_bias`,
  `logprobs`/`top_logprobs`, `response_format`) are parsed by `sampling.parse_sampling`; whether
  the engine honours them is the service's check (engines/features.py).
* `max_completion_tokens` is OpenAI's name for the budget (`max_tokens` is deprecated); when
  both are sent they must agree. `top_k` is accepted as an extension (as vLLM and TGI do; -1
  means "off", like our 0). vLLM's `stream_options.continuous_usage_stats` is honoured.
* `stream_options` is accepted without `stream: true` and then ignored (OpenAI answers 400
  there; being lenient cannot change the answer and spares clients that always send it).
* `messages` are parsed by messages.py; `tools` and `tool_choice` by tools.py. The body's key
  helpers (unknown and neutral-only fields) are body.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from serve_app.config import GenerationParams

# The body's key helpers and the message limits are also the Responses parser's (and the
# completions parser's): they are imported from here.
from serve_app.openai_api.body import (  # noqa: F401 - re-exported
    _check_keys,
    _ignored_keys,
    _load_body,
    strict_bool,
)
from serve_app.openai_api.messages import (  # noqa: F401 - re-exported
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    ROLES,
    _parse_messages,
)
from serve_app.openai_api.sampling import Sampling, parse_sampling
from serve_app.openai_api.tools import Tool, ToolChoice, parse_tool_choice, parse_tools
from serve_app.refusals import invalid_request, model_not_found
from serve_app.validation import whole_number

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512
MAX_USER_CHARS = 512

# Fields we honour (parsed below or in sampling.py), those that cannot change the answer, and
# known ones we cannot honour unless they carry their neutral value (compared with ==, after
# None is accepted). Anything else is unknown: accepted, ignored and reported.
_SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "stop", "seed", "user", "n", "ignore_eos", "min_tokens",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "tools", "tool_choice",
}  # fmt: skip
_HARMLESS = {
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "parallel_tool_calls", "prompt_cache_options",
}  # fmt: skip
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "moderation": (),
    # vLLM's chat-template fields (Open WebUI sends them): only their defaults are built.
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    # vLLM's sampling extensions: they would change the answer.
    "repetition_penalty": (1,),
    "min_p": (0,),
    "best_of": (1,),
    "use_beam_search": (False,),
    "length_penalty": (1,),
    "echo": (False,),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "bad_words": ([],),
    "allowed_token_ids": (),
}
_STREAM_OPTIONS = {"include_usage", "continuous_usage_stats", "include_obfuscation"}
_STRICT = ConfigDict(strict=True)


def _param_adapter(name: str) -> TypeAdapter:
    """A validator for one GenerationParams field: its type and its ranges (one definition)."""
    info = GenerationParams.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)], config=_STRICT)


_PARAM_ADAPTERS = {name: _param_adapter(name) for name in GenerationParams.model_fields}


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A valid `/v1/chat/completions` request in ChatStream's terms."""

    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)  # only what the client set
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats
    seed: int | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    ignored: tuple[str, ...] = ()  # unknown fields, accepted and ignored (their paths)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")

    @property
    def session_key(self) -> str | None:
        return session_key(self.prompt_cache_key, self.user)

    def generation_params(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """`defaults` (GenerationParams names) overridden by the client's parameters."""
        return {**defaults, **self.params}


def _validate_param(name: str, param: str, value: Any) -> Any:
    try:
        return _PARAM_ADAPTERS[name].validate_python(whole_number(value))
    except ValidationError as exc:
        raise invalid_request(
            f"'{param}': {exc.errors()[0]['msg']} (got {value!r})", param
        ) from None


def parse_stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid_request(
            "'stop' must be a string or an array of strings", "stop", "invalid_type"
        )
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid_request(f"'stop' allows at most {MAX_STOP_SEQUENCES} sequences", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid_request(f"each 'stop' sequence must be 1-{MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(stops))


def check_model(data: Mapping[str, Any], served_model: str) -> str:
    """The body's `model`: required, and the served one (404 else)."""
    model = data.get("model")
    if model is None:
        raise invalid_request("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_request("'model' must be a string", "model", "invalid_type")
    if model != served_model:
        raise model_not_found(model, served_model)
    return model


def _parse_stream_options(data: Mapping[str, Any], stream: bool, ignored: list[str]):
    """`(include_usage, continuous_usage)`: both only when streaming; malformed values are
    refused whatever their use."""
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "'stream_options' must be an object", "stream_options", "invalid_type"
        )
    options = options or {}
    ignored += _ignored_keys(options, _STREAM_OPTIONS, prefix="stream_options.")
    asked_usage = strict_bool(options, "include_usage", "stream_options.include_usage")
    asked_continuous = strict_bool(
        options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
    )
    include_usage = stream and asked_usage
    return include_usage, include_usage and asked_continuous


def parse_generation_params(data: Mapping[str, Any], budget: str = "max_tokens") -> dict[str, Any]:
    """temperature, top_p, top_k and the token budget, in GenerationParams' names. `budget`:
    the deprecated alias's name (`max_completion_tokens` is OpenAI's current one on chat)."""
    params: dict[str, Any] = {}
    for param, name in (("temperature", "temperature"), ("top_p", "top_p")):
        if data.get(param) is not None:
            params[name] = _validate_param(name, param, data[param])
    if data.get("top_k") is not None:
        top_k = data["top_k"]
        params["top_k"] = 0 if top_k == -1 and type(top_k) is int else top_k
        params["top_k"] = _validate_param("top_k", "top_k", params["top_k"])
    max_tokens, max_completion = data.get(budget), data.get("max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid_request(
            f"'{budget}' and 'max_completion_tokens' disagree; send one of them", budget
        )
    if max_completion is not None:
        params["max_new_tokens"] = _validate_param(
            "max_new_tokens", "max_completion_tokens", max_completion
        )
    elif max_tokens is not None:
        params["max_new_tokens"] = _validate_param("max_new_tokens", budget, max_tokens)
    return params


def parse_seed(data: Mapping[str, Any]) -> int | None:
    seed = data.get("seed")
    if seed is not None and (type(seed) is not int or not -(2**63) <= seed < 2**63):
        raise invalid_request("'seed' must be a 64-bit integer", "seed", "invalid_type")
    return seed


def parse_user(data: Mapping[str, Any]) -> str | None:
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise invalid_request(
            f"'user' must be a string of at most {MAX_USER_CHARS} characters", "user"
        )
    return user


def session_key(prompt_cache_key: str | None, user: str | None) -> str | None:
    """The routing and KV-reuse key (`GenerationRequest.session`) of a /v1 request:
    `prompt_cache_key`, else `user`; namespaced apart from chat sessions and Responses chains."""
    key = prompt_cache_key or user
    return f"v1:{key}" if key else None


def parse_prompt_cache_key(data: Mapping[str, Any]) -> str | None:
    cache_key = data.get("prompt_cache_key")
    if cache_key is not None and (
        not isinstance(cache_key, str) or len(cache_key) > MAX_USER_CHARS
    ):
        raise invalid_request(
            f"'prompt_cache_key' must be a string of at most {MAX_USER_CHARS} characters",
            "prompt_cache_key",
        )
    return cache_key


def parse_chat_completion(
    body: bytes | str | Mapping[str, Any],
    *,
    served_model: str,
) -> ChatCompletionRequest:
    """Validate a `/v1/chat/completions` body. Raises `Refusal` (400, or 404 for a model other
    than `served_model`)."""
    data = _load_body(body)
    ignored = _ignored_keys(data, _SUPPORTED | _HARMLESS, _NEUTRAL)
    model = check_model(data, served_model)
    messages = _parse_messages(data.get("messages"), ignored)
    stream = strict_bool(data, "stream", "stream")
    include_usage, continuous_usage = _parse_stream_options(data, stream, ignored)
    params = parse_generation_params(data)
    tools = parse_tools(data.get("tools"))
    return ChatCompletionRequest(
        tools=tools,
        tool_choice=parse_tool_choice(data.get("tool_choice"), tools),
        model=model,
        messages=messages,
        params=params,
        stop=parse_stop(data.get("stop")),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        seed=parse_seed(data),
        user=parse_user(data),
        sampling=parse_sampling(data, max_tokens=params.get("max_new_tokens")),
        ignored=tuple(ignored),
        prompt_cache_key=parse_prompt_cache_key(data),
    )
