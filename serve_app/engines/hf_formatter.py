"""The ingress's side of the `transformers` engine: the chat template and token counting with
the model's tokenizer only (no weights, no torch), so that a prompt that does not fit the
context is refused before it takes a generation slot, and what the engine gets is token ids in
which user text stays text (chat_tokens.py)."""

from __future__ import annotations

from serve_app.config import ChatStreamConfig
from serve_app.engines.base import ChatMessage, ModelInput, PromptFormatter
from serve_app.engines.chat_tokens import describe_tokens, encode_chat, prompt_token_ids
from serve_app.engines.hf_loading import context_length, load_tokenizer


class TransformersPromptFormatter(PromptFormatter):
    """Chat template rendering and token counting with the model's tokenizer (no weights)."""

    def __init__(self, config: ChatStreamConfig) -> None:
        self.tokenizer = load_tokenizer(config)
        self.context_length = context_length(config)

    def render(self, messages: list[ChatMessage]) -> str:
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=True
        )

    def count_tokens(self, text: str) -> int:
        return len(prompt_token_ids(self.tokenizer, text))

    def model_input(self, messages: list[ChatMessage]) -> list[int]:
        # Token ids, so that user text stays text (serve_app/engines/chat_tokens.py).
        return encode_chat(self.tokenizer, [m.as_dict() for m in messages])

    def describe(self, model_input: ModelInput) -> list[dict]:
        if isinstance(model_input, str):
            model_input = prompt_token_ids(self.tokenizer, model_input)
        return describe_tokens(self.tokenizer, model_input)
