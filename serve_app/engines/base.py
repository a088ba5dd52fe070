"""The engine interface: everything the model deployment needs from a text generator."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve_app.model_contract import AnswerChunk, GenerationRequest, ModelInput

__all__ = ["AnswerChunk", "ChatMessage", "Engine", "EngineError", "ModelInput", "PromptFormatter"]


class EngineError(RuntimeError):
    """The engine failed while generating (reported as `unknown_error_occurred`)."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class PromptFormatter(abc.ABC):
    """Turns a conversation into the model's prompt text and measures it in tokens.

    The ingress owns one (tokenizer only, no weights) so that a prompt that does not fit the
    context is refused before it takes a generation slot.
    """

    context_length: int

    @abc.abstractmethod
    def render(self, messages: list[ChatMessage]) -> str:
        """The prompt for `messages`, ending where the assistant's answer starts."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int: ...

    def model_input(self, messages: list[ChatMessage]) -> ModelInput:
        """What the engine gets for `messages`: the rendered text, or (engines with a
        tokenizer) token ids in which message contents can never be control tokens."""
        return self.render(messages)

    def input_tokens(self, model_input: ModelInput) -> int:
        if isinstance(model_input, list):
            return len(model_input)
        return self.count_tokens(model_input)

    def describe(self, model_input: ModelInput) -> list[dict] | None:
        """The model input token by token (for `GET /prompt`), if the engine tokenizes."""
        return None


class Engine(abc.ABC):
    """Streams an answer for a prompt.

    `stream` yields `AnswerChunk`s; the last one, always (with empty text if need be), carries
    the finish reason. With `request.seed`, sampling is reproducible: the same seed and prompt
    give the same answer, alone or batched. Stop strings are the model deployment's business.
    `stream` must stop promptly when the consuming task is cancelled (or the generator is
    closed): that is how a disconnected client, or a stop string, frees its slot.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights etc. Called once before the first `stream`."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]: ...

    @abc.abstractmethod
    def count_text_tokens(self, text: str) -> int:
        """Tokens of a text prompt, as this engine will tokenize it."""

    def prompt_tokens(self, prompt: ModelInput) -> int:
        """The prompt's length in tokens as the engine sees it."""
        return len(prompt) if isinstance(prompt, list) else self.count_text_tokens(prompt)

    async def check_health(self) -> None:  # noqa: B027 - optional hook
        """Raise if the engine can no longer serve."""

    @property
    def running(self) -> int:
        """Generations in progress on this engine."""
        return 0
