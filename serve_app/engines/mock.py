"""The mock engine: instant start, deterministic answers, tunable speed (tests, load tests)."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterable

from serve_app.config import ChatStreamConfig
from serve_app.engines.base import ChatMessage, Engine, EngineError, PromptFormatter
from serve_app.engines.mock_output import answer_words, constrained_text, mock_logprob, repeat_words
from serve_app.model_contract import AnswerChunk, GenerationRequest

_LONG_TEXT = (
    "Streaming lets a chat client show each token the moment the model produces it, so the "
    "user starts reading long before the answer is complete. "
)
# A "token" of the mock world: a word with the whitespace before it.
_TOKEN_RE = re.compile(r"\s*\S+")
_USER_TAG = "<|user|>\n"
_ASSISTANT_TAG = "<|assistant|>\n"
_END_TAG = "<|end|>\n"


def split_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def last_user_message(prompt: str) -> str:
    """The last user turn of a prompt rendered by `MockPromptFormatter`."""
    start = prompt.rfind(_USER_TAG)
    if start < 0:
        return prompt
    body = prompt[start + len(_USER_TAG) :]
    return body.split(_END_TAG, 1)[0]


def mock_answer_tokens(mode: str, user_text: str) -> Iterable[str]:
    """The (possibly endless) token sequence the mock answers with."""
    words = split_tokens(user_text.strip()) or ["(empty)"]
    if mode == "echo":
        return words
    if mode == "round":
        return repeat_words(words)
    return repeat_words(split_tokens(_LONG_TEXT.strip()))


class MockPromptFormatter(PromptFormatter):
    """A simple tagged chat format; one token per word."""

    def __init__(self, config: ChatStreamConfig) -> None:
        self.context_length = config.max_context_tokens or 2048

    def render(self, messages: list[ChatMessage]) -> str:
        parts = [f"<|{m.role}|>\n{m.content}{_END_TAG}" for m in messages]
        return "".join(parts) + _ASSISTANT_TAG

    def count_tokens(self, text: str) -> int:
        return len(split_tokens(text))


class MockEngine(Engine):
    """Answers without a model: `echo` repeats the last user message once, `round` repeats it up
    to `max_new_tokens`, `long` streams a long text up to `max_new_tokens`.

    One chunk per word (no token ids: the mock has none); the last one says `stop` when the
    echo ended, `length` when `max_new_tokens` did. Deterministic, so a `seed` changes nothing.
    It honours `ignore_eos`, `min_tokens`, `logprobs` and output constraints as mock_output.py
    describes (one chunk per character under a constraint); penalties and `logit_bias` would
    be pretence without logits, so the features table refuses them for the mock.
    """

    def __init__(self, config: ChatStreamConfig) -> None:
        self.mode = config.mock_mode
        self.initial_wait_sec = config.mock_initial_wait_sec
        self.time_per_token_sec = config.mock_time_per_token_sec
        self.fail_marker = config.mock_fail_marker
        self._running = 0

    async def start(self) -> None:
        return None

    @property
    def running(self) -> int:
        return self._running

    def count_text_tokens(self, text: str) -> int:
        return len(split_tokens(text))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]:
        self._running += 1
        try:
            if self.initial_wait_sec:
                await asyncio.sleep(self.initial_wait_sec)
            user_text = last_user_message(request.prompt)
            answer = mock_answer_tokens(self.mode, user_text)
            limit = request.params.max_new_tokens
            if request.constraint is not None:
                try:
                    tokens, finish = constrained_text(
                        request.constraint, "".join(itertools.islice(answer, 64)).strip(), limit
                    )
                except ValueError as exc:
                    raise EngineError(str(exc)) from exc
            else:
                tokens, finish = answer_words(answer, limit, request.ignore_eos, request.min_tokens)
            for index, token in enumerate(tokens, start=1):
                if index > 1 and self.fail_marker and self.fail_marker in user_text:
                    raise EngineError("mock engine failure requested by mock_fail_marker")
                if self.time_per_token_sec:
                    await asyncio.sleep(self.time_per_token_sec)
                else:
                    await asyncio.sleep(0)  # stay cancellable and fair to other streams
                logprobs = (
                    (mock_logprob(token, request.logprobs),) if request.logprobs is not None else ()
                )
                last = index == len(tokens)
                yield AnswerChunk(
                    token, 1, finish_reason=finish if last else None, logprobs=logprobs
                )
            if not tokens:  # nothing to say: the last chunk is empty
                yield AnswerChunk("", 0, finish_reason=finish)
        finally:
            self._running -= 1
