"""The `transformers` engine: a Hugging Face causal LM with continuous batching.

`TransformersEngine` bridges the asyncio world (one async generator per stream, on the Ray
Serve replica's event loop) and the `BatchScheduler`, which runs every forward pass in one
dedicated worker thread so the event loop never blocks on the model. The ingress's side, the
`TransformersPromptFormatter`, is in hf_formatter.py (tokenizer only, no torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import torch

from serve_app.config import ChatStreamConfig
from serve_app.engines.base import Engine, EngineError
from serve_app.engines.chat_tokens import prompt_token_ids
from serve_app.engines.hf_formatter import TransformersPromptFormatter
from serve_app.engines.hf_loading import (
    context_length,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from serve_app.engines.prefix_cache import PrefixCache
from serve_app.engines.request_state import Event, Request, StreamEnd
from serve_app.engines.scheduler import BatchScheduler
from serve_app.engines.threads import ray_cpu_allotment, torch_threads
from serve_app.metrics import PREFIX_TOKENS
from serve_app.model_contract import AnswerChunk, GenerationRequest, merge_chunks

__all__ = ["TransformersEngine", "TransformersPromptFormatter", "resolve_model_source"]


def deliver_to_event_loops(batch: list[tuple[Request, Event]]) -> None:
    """Hand a step's events to their streams: one thread-safe call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
    for request, event in batch:
        loop, queue = request.consumer
        by_loop.setdefault(loop, []).append((queue, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # loop closed: its consumers are gone
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class TransformersEngine(Engine):
    def __init__(self, config: ChatStreamConfig) -> None:
        self.config = config
        self._scheduler: BatchScheduler | None = None
        self._thread: threading.Thread | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.num_threads: int | None = None  # torch threads, decided when loading

    async def start(self) -> None:
        """Load the model and start the worker, both on one new thread; returns once loaded."""
        if self._thread is not None:
            return
        try:  # seconds (GGUF de-quantization); the event loop stays free meanwhile
            await asyncio.wrap_future(self._start_worker(self._load))
        except BaseException:
            self._thread = None
            raise

    def start_with(
        self, model: Any, tokenizer: Any, device: str, context_length: int, **options: Any
    ) -> None:
        """Start the worker on an already loaded model (tests: shared weights, other options);
        `options` go to `BatchScheduler` (e.g. `prefill_chunk_tokens`)."""
        self._start_worker(lambda: (model, tokenizer, device, context_length), options).result()

    def _start_worker(self, load: Callable[[], tuple], options: dict | None = None) -> Future:
        """A new worker thread that calls `load`, builds the scheduler and runs it until
        stopped; the future is done once the scheduler is built.

        Loading runs on the worker thread too, not on a helper thread: every thread that runs
        torch operators gets its own OpenMP team, and once a process has more OpenMP threads
        than cores, libgomp stops spinning between parallel regions for all of them. Measured
        in a replica on 2 cores (8 streams): a decode step took 85 ms after loading on another
        thread, 75 ms after loading on this one.
        """
        started: Future = Future()

        def work() -> None:
            try:
                self.num_threads = torch_threads(self.config, ray_cpu_allotment())
                torch.set_num_threads(self.num_threads)  # for loading; `run` sets it again
                model, tokenizer, device, max_context = load()
                scheduler = BatchScheduler(
                    model,
                    tokenizer,
                    device=device,
                    context_length=max_context,
                    max_batch_size=self.config.max_ongoing_requests,
                    deliver=deliver_to_event_loops,
                    num_threads=self.num_threads,
                    **({"prefix_cache": self._prefix_cache()} | (options or {})),
                )
            except BaseException as exc:
                started.set_exception(exc)
                return
            self.model, self.tokenizer, self._scheduler = model, tokenizer, scheduler
            started.set_result(None)
            scheduler.run()

        self._thread = threading.Thread(target=work, name="transformers-engine", daemon=True)
        self._thread.start()
        return started

    def _prefix_cache(self) -> PrefixCache | None:
        budget = self.config.prefix_cache_mb * 2**20
        return PrefixCache(budget) if budget else None

    def _load(self) -> tuple[Any, Any, str, int]:
        tokenizer = load_tokenizer(self.config)
        model, device = load_model(self.config)
        return model, tokenizer, device, context_length(self.config, model.config)

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise EngineError("the engine was not started")
        return self._scheduler

    @property
    def running(self) -> int:
        return self._scheduler.running if self._scheduler is not None else 0

    async def check_health(self) -> None:
        scheduler = self.scheduler
        if scheduler.fatal_error is not None or not self._thread or not self._thread.is_alive():
            raise EngineError(f"engine worker is not running: {scheduler.fatal_error!r}")

    def count_text_tokens(self, text: str) -> int:
        return len(prompt_token_ids(self.tokenizer, text))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerChunk]:
        scheduler = self.scheduler
        events: asyncio.Queue[Event] = asyncio.Queue()
        consumer = (asyncio.get_running_loop(), events)
        job = Request(
            request.prompt,
            request.params,
            request.seed,
            consumer,
            session=request.session,
            spec=request,
        )
        try:
            scheduler.submit(job)
        except RuntimeError as exc:  # stopped, or its worker died
            raise EngineError(str(exc)) from exc
        try:
            while True:
                event = await events.get()
                # Tokens that piled up while the consumer was busy go out as one chunk: no
                # added latency when the consumer keeps up, fewer chunks when it does not.
                chunks: list[AnswerChunk] = []
                while isinstance(event, AnswerChunk):
                    chunks.append(event)
                    if events.empty():
                        break
                    event = events.get_nowait()
                if chunks:
                    yield merge_chunks(chunks)
                if isinstance(event, StreamEnd):
                    if event.error is not None:
                        raise EngineError(event.error)
                    return
        finally:
            # Cancelled task, closed generator or normal end: the worker drops the request
            # before its next decode step (a no-op when it already finished).
            scheduler.cancel(job)
            count_prompt_tokens(job)

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the engine's worker thread between decode steps (`BatchScheduler.call`)."""
        try:
            future = self.scheduler.call(fn)
        except RuntimeError as exc:
            raise EngineError(str(exc)) from exc
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the worker thread (pending and running streams end with an EngineError)."""
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)


def count_prompt_tokens(job: Request) -> None:
    """Prompt tokens reused from a kept prefix vs run through the model (metrics)."""
    if job.prompt_len:
        counter = PREFIX_TOKENS.get()
        if job.reused:
            counter.inc(job.reused, {"kind": "reused"})
        counter.inc(job.prompt_len - job.reused, {"kind": "prefilled"})
