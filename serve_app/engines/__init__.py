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
    from serve_app.engines.transformers_engine import TransformersEngine

    return TransformersEngine(config)


def make_prompt_formatter(config: ChatStreamConfig) -> PromptFormatter:
    if config.engine == "mock":
        from serve_app.engines.mock import MockPromptFormatter

        return MockPromptFormatter(config)
    from serve_app.engines.hf_formatter import TransformersPromptFormatter

    return TransformersPromptFormatter(config)
