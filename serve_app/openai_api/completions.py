"""`POST /v1/completions` (OpenAI's legacy text completions) as pure functions: the body's
parsing and the `text_completion` objects.

* `prompt` is text or token ids (a list of ints; also either wrapped in a one-element list, as
  clients that batch send it). Several prompts in one request are a 400: one request is one
  admission. Token ids are checked against the vocabulary and the context by the service.
* `echo` puts the prompt before the answer; with `logprobs` it is a 400 (the engines give no
  log probabilities of prompt tokens). `logprobs: k` is the legacy format
  (serve_app/openai_api/logprobs.py). `suffix` and `best_of` are refused unless neutral.
* The other fields (budget, sampling, `stop`, `seed`, `stream_options`, unknown fields) are
  parsed as on chat, by the same functions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.model_contract import TokenLogprob
from serve_app.openai_api.encoding import sse_event, usage
from serve_app.openai_api.logprobs import completion_logprobs
from serve_app.openai_api.protocol import (
    MAX_CONTENT_CHARS,
    _ignored_keys,
    _load_body,
    _parse_stream_options,
    check_model,
    parse_generation_params,
    parse_prompt_cache_key,
    parse_seed,
    parse_stop,
    parse_user,
    session_key,
    strict_bool,
)
from serve_app.openai_api.sampling import Sampling, parse_sampling
from serve_app.refusals import invalid_request

MAX_PROMPT_TOKEN_IDS = 1 << 20  # the context check refuses far fewer

_KNOWN = {
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p",
    "top_k", "stop", "seed", "user", "n", "echo", "logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "ignore_eos", "min_tokens",
}  # fmt: skip
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "best_of": (1,),
    "response_format": (),
    "repetition_penalty": (1,),
    "min_p": (0,),
    "use_beam_search": (False,),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "prompt_logprobs": (),
}


@dataclass(frozen=True)
class CompletionRequest:
    """A valid `/v1/completions` request."""

    model: str
    prompt: str | list[int]
    params: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    seed: int | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    echo: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    ignored: tuple[str, ...] = ()

    @property
    def session_key(self) -> str | None:
        return session_key(self.prompt_cache_key, self.user)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def parse_prompt(raw: Any) -> str | list[int]:
    """Text or token ids; a one-element batch is unwrapped."""
    if (
        isinstance(raw, list)
        and len(raw) == 1
        and (isinstance(raw[0], str) or _is_token_ids(raw[0]))
    ):
        raw = raw[0]
    if raw is None:
        raise invalid_request("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(raw, str):
        if not raw:
            raise invalid_request("'prompt' must not be empty", "prompt")
        if len(raw) > MAX_CONTENT_CHARS:
            raise invalid_request(
                f"'prompt' is longer than {MAX_CONTENT_CHARS} characters", "prompt"
            )
        return raw
    if _is_token_ids(raw) and raw:
        if len(raw) > MAX_PROMPT_TOKEN_IDS or any(t < 0 for t in raw):
            raise invalid_request("'prompt' token ids must be non-negative token ids", "prompt")
        return raw
    if isinstance(raw, list) and len(raw) > 1:
        raise invalid_request(
            "'prompt' holds several prompts; send one per request",
            "prompt",
            "unsupported_parameter",
        )
    raise invalid_request(
        "'prompt' must be a non-empty string or a non-empty array of token ids",
        "prompt",
        "invalid_type",
    )


def parse_completion(
    body: bytes | str | Mapping[str, Any], *, served_model: str
) -> CompletionRequest:
    """Validate a `/v1/completions` body. Raises `Refusal` (400, or 404 for another model)."""
    data = _load_body(body)
    ignored = _ignored_keys(data, _KNOWN, _NEUTRAL)
    model = check_model(data, served_model)
    prompt = parse_prompt(data.get("prompt"))
    stream = strict_bool(data, "stream", "stream")
    include_usage, continuous = _parse_stream_options(data, stream, ignored)
    params = parse_generation_params(
        {k: v for k, v in data.items() if k != "max_completion_tokens"}
    )
    sampling = parse_sampling(data, max_tokens=params.get("max_new_tokens"), legacy=True)
    echo = strict_bool(data, "echo", "echo")
    if echo and sampling.logprobs is not None:
        raise invalid_request(
            "'echo' with 'logprobs' needs the prompt's log probabilities, which this server "
            "does not compute",
            "echo",
            "unsupported_parameter",
        )
    return CompletionRequest(
        model=model,
        prompt=prompt,
        params=params,
        stop=parse_stop(data.get("stop")),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        seed=parse_seed(data),
        user=parse_user(data),
        prompt_cache_key=parse_prompt_cache_key(data),
        echo=echo,
        sampling=sampling,
        ignored=tuple(ignored),
    )


# ---------------------------------------------------------------------------------- answers
def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _choice(
    text: str, logprobs: dict[str, Any] | None, finish_reason: str | None, index: int = 0
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(
    *,
    text: str,
    finish_reason: str,
    index: int = 0,
    logprobs: Sequence[TokenLogprob] | None = None,
    echoed: str = "",
) -> dict[str, Any]:
    """One choice of a whole `text_completion`: `echoed` (the prompt, with `echo`), then the
    answer."""
    encoded = None if logprobs is None else completion_logprobs(logprobs, len(echoed))
    return _choice(echoed + text, encoded, finish_reason, index)


def text_completion_of(
    *, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A whole `text_completion` of `choices`; `usage` counts them all."""
    return {
        "id": new_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_completion(
    *,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: Sequence[TokenLogprob] | None = None,
    echoed: str = "",
) -> dict[str, Any]:
    """A whole `text_completion` of one choice."""
    choice = completion_choice(
        text=text, finish_reason=finish_reason, logprobs=logprobs, echoed=echoed
    )
    return text_completion_of(
        model=model,
        choices=[choice],
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


class CompletionStreamEncoder:
    """The SSE text of one streamed `/v1/completions` answer (the interface of the chat
    `StreamEncoder`, so that the same admission encoder drives both): text chunks (the echoed
    prompt first, with `echo`), a final chunk with `finish_reason`, the usage chunk if asked
    for, `data: [DONE]`. With `n` > 1, one encoder per choice (`for_choice`): the same id."""

    def __init__(self, request: CompletionRequest, echoed: str = "", index: int = 0) -> None:
        self._request = request
        self._id = new_id()
        self._created = int(time.time())
        self._index = index
        self._echoed = echoed
        self._pending = echoed
        self._offset = 0
        self._with_logprobs = request.sampling.logprobs is not None

    def for_choice(self, index: int) -> CompletionStreamEncoder:
        """A fresh encoder of choice `index` in the same stream."""
        other = CompletionStreamEncoder(self._request, self._echoed, index)
        other._id, other._created = self._id, self._created
        return other

    def _event(self, choices: list[dict[str, Any]], counts: dict[str, int], last: bool = False):
        chunk: dict[str, Any] = {
            "id": self._id, "object": "text_completion", "created": self._created,
            "model": self._request.model, "choices": choices,
        }  # fmt: skip
        if last or self._request.continuous_usage:
            chunk["usage"] = usage(**counts)
        return sse_event(chunk)

    def feed(
        self,
        text: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> str:
        prefix, self._pending = self._pending, ""
        if not prefix and not text and not logprobs:
            return ""
        start = self._offset + len(prefix)
        encoded = completion_logprobs(logprobs, start) if self._with_logprobs else None
        text = prefix + text
        self._offset += len(text)
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return self._event([_choice(text, encoded, None, self._index)], counts)

    def end(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> str:
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        return self.finish(finish_reason=finish_reason, **counts) + self.close(**counts)

    def finish(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> str:
        """What is left of this choice's text (the echo), then its `finish_reason` chunk."""
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        last = self._event([_choice("", None, finish_reason, self._index)], counts)
        return self.feed("", **counts) + last

    def close(self, *, prompt_tokens: int, completion_tokens: int) -> str:
        """The stream's end: the usage chunk if asked for, then `data: [DONE]`."""
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        events = []
        if self._request.include_usage:
            events.append(self._event([], counts, last=True))
        events.append("data: [DONE]\n\n")
        return "".join(events)
