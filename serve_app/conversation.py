"""Pure logic of a prompt: the conversation as the model sees it, fitting it to the context,
and the generation parameters. `plan_turn` plans a session's turn (older turns give way to the
context); `plan_messages` plans a stateless /v1 request (the messages are used as sent, or
refused). Both measure and cap the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.engines.base import ChatMessage, PromptFormatter
from serve_app.model_contract import ModelInput
from serve_app.refusals import Refusal, invalid_request
from serve_app.session_state import trim_history
from serve_app.validation import ChatTurnRequest

Message = dict[str, Any]


class ChatPrompt:
    """The conversation of one session, as the model sees it (the seed's `chat_prompt`)."""

    def __init__(
        self, messages: list[dict[str, Any]], formatter: PromptFormatter, system_prompt: str = ""
    ) -> None:
        self.messages = messages
        self.formatter = formatter
        self.system_prompt = system_prompt

    def chat_messages(self) -> list[ChatMessage]:
        turns = [ChatMessage(m["role"], m["content"]) for m in self.messages]
        if self.system_prompt:
            turns.insert(0, ChatMessage("system", self.system_prompt))
        return turns

    def create_prompt(self) -> str:
        """The prompt text for the history so far, ready for the model's next answer."""
        return self.formatter.render(self.chat_messages())

    def model_input(self) -> ModelInput:
        """What the engine gets: token ids in which message contents are only text (or, for
        engines without a tokenizer, the prompt text)."""
        return self.formatter.model_input(self.chat_messages())


@dataclass(frozen=True)
class TurnPlan:
    """What to generate: `messages` ends with the user turn the answer will follow."""

    messages: list[Message]
    prompt: str
    model_input: ModelInput  # what the engine gets (see ChatPrompt.model_input)
    prompt_tokens: int
    params: dict[str, Any]


def messages_before_answer(history: list[Message], turn: ChatTurnRequest) -> list[Message]:
    """The history the new answer follows. Regenerate drops the last answer, if any, and
    answers the last user message again; otherwise the new user input is appended."""
    if not turn.regenerate:
        return [*history, {"role": "user", "content": turn.user_input}]
    base = history[:-1] if history and history[-1]["role"] == "assistant" else history
    if not base or base[-1]["role"] != "user":
        raise Refusal(409, "nothing_to_regenerate", "there is no answer to regenerate yet")
    return list(base)


def measure(
    messages: list[Message], formatter: PromptFormatter, system_prompt: str
) -> tuple[ChatPrompt, ModelInput, int]:
    """The prompt for `messages`, what the engine gets for it, and its length in tokens."""
    chat_prompt = ChatPrompt(messages, formatter, system_prompt)
    model_input = chat_prompt.model_input()
    return chat_prompt, model_input, formatter.input_tokens(model_input)


def capped_params(
    params: dict[str, Any], prompt_tokens: int, context_length: int
) -> dict[str, Any]:
    """`params` with the token budget capped to what the context leaves after the prompt."""
    return {
        **params,
        "max_new_tokens": min(params["max_new_tokens"], context_length - prompt_tokens),
    }


def fit_to_context(
    messages: list[Message], formatter: PromptFormatter, system_prompt: str
) -> tuple[list[Message], str, ModelInput, int]:
    """Drop the oldest turns until the prompt leaves room for at least one answer token.

    Refuses (413) when even the last user message alone does not fit."""
    while True:
        chat_prompt, model_input, tokens = measure(messages, formatter, system_prompt)
        if tokens < formatter.context_length:
            return messages, chat_prompt.create_prompt(), model_input, tokens
        next_user = next((i for i, m in enumerate(messages) if i > 0 and m["role"] == "user"), None)
        if next_user is None:
            raise Refusal(
                413,
                "prompt_too_long",
                f"the prompt is {tokens} tokens but the model's context is "
                f"{formatter.context_length}; send a shorter user_input",
                param="messages",
            )
        messages = messages[next_user:]


def plan_turn(
    history: list[Message],
    turn: ChatTurnRequest,
    *,
    defaults: dict[str, Any],
    session_params: dict[str, Any],
    formatter: PromptFormatter,
    system_prompt: str = "",
    max_turns: int = 50,
) -> TurnPlan:
    messages = trim_history(messages_before_answer(history, turn), max_turns)
    messages, prompt, model_input, prompt_tokens = fit_to_context(
        messages, formatter, system_prompt
    )
    params = capped_params(
        {**defaults, **session_params, **turn.as_dict()}, prompt_tokens, formatter.context_length
    )
    return TurnPlan(messages, prompt, model_input, prompt_tokens, params)


def plan_messages(
    messages: list[Message],
    *,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    formatter: PromptFormatter,
    system_prompt: str = "",
) -> TurnPlan:
    """Plan a stateless request: the client's messages as sent (dropping any would change the
    answer), the app's `system_prompt` only when the client sent no system message.

    A prompt that leaves no room for an answer, or an explicit token budget over what the
    context leaves, is a 400 `context_length_exceeded`; the default budget is capped."""
    if any(m["role"] == "system" for m in messages):
        system_prompt = ""
    chat_prompt, model_input, prompt_tokens = measure(messages, formatter, system_prompt)
    room = formatter.context_length - prompt_tokens
    if room < 1:
        raise invalid_request(
            f"the prompt is {prompt_tokens} tokens but the model's context is "
            f"{formatter.context_length}; send fewer or shorter messages",
            "messages",
            "context_length_exceeded",
        )
    asked = overrides.get("max_new_tokens")
    if asked is not None and asked > room:
        raise invalid_request(
            f"the prompt is {prompt_tokens} tokens and {asked} more were asked for, but the "
            f"model's context is {formatter.context_length}",
            "max_tokens",
            "context_length_exceeded",
        )
    params = capped_params({**defaults, **overrides}, prompt_tokens, formatter.context_length)
    return TurnPlan(messages, chat_prompt.create_prompt(), model_input, prompt_tokens, params)
