"""Engines behind one interface (`base.Engine`). Heavy engines are imported only when chosen."""

from __future__ import annotations

from serve_app.config import ChatStreamConfig
from serve_app.engines.base import ChatMessage, Engine, EngineError, PromptFormatter

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineError",
    "PromptFormatter",
    "make_engine",
    "make_prompt_formatter",
]


def make_engine(config: ChatStreamConfig) -> Engine:
    if config.engine == "mock":
        from serve_app.engines.mock import MockEngine

        return MockEngine(config)
    if config.engine == "vllm":
        from serve_app.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from serve_app.engines.transformers_engine import TransformersEngine

    return TransformersEngine(config)


def make_prompt_formatter(config: ChatStreamConfig) -> PromptFormatter:
    if config.engine == "mock":
        from serve_app.engines.mock import MockPromptFormatter

        return MockPromptFormatter(config)
    # vLLM serves the same tokenizer (a converted GGUF keeps the GGUF's): one formatter for both.
    from serve_app.engines.hf_formatter import TransformersPromptFormatter

    return TransformersPromptFormatter(config)
