"""Continuous batching over a Hugging Face causal LM's KV cache, in one worker thread.

Every concurrent stream of an engine shares one forward pass per decode step. Requests that
arrived since the last prefill started form one group, left-padded to a common width; its
prompts run through the model `PREFILL_CHUNK_TOKENS` tokens per row at a time, one chunk
between two decode steps, so a stream that is already decoding waits for about one decode
step's worth of prefill per newcomer between two of its tokens, however long the prompts.
After its last chunk the group's first tokens go out and its rows join the batch; a finished
or cancelled request leaves before the next step. The batch keeps one `DynamicCache` whose
rows are left-padded to a common length; an attention mask hides the padding and each row
carries its own position ids (kv_cache.py says why not transformers' own batching manager).

Everything that does not need the model lives beside it, testable on its own: sampling and stop
checks (sampling.py), KV-cache row surgery (kv_cache.py), incremental detokenization
(detokenizer.py), a request's state and its events (request_state.py).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from serve_app.engines.kv_cache import BatchCache, cache_supports_row_surgery, keep_rows, new_cache
from serve_app.engines.logits_processing import (
    ControlsFactory,
    RowScores,
    next_tokens,
    token_text_cache,
)
from serve_app.engines.prefix_cache import PrefixCache, group_cache, keep_prefixes, take_prefix
from serve_app.engines.request_state import (
    FINISH_REASONS,
    PREFILL_CHUNK_TOKENS,
    Deliver,
    Event,
    PrefillGroup,
    Request,
    StreamEnd,
)
from serve_app.engines.sampling import eos_token_ids, stop_reason

logger = logging.getLogger(__name__)


class BatchScheduler:
    """Owns the model: call `run()` in a dedicated thread, `submit`/`cancel` from anywhere.

    Events are handed to `deliver` (from the worker thread) once per prefill and once per
    decode step, all requests together: one wake-up of the consumers' event loop per step
    instead of one per stream per token, which matters when the loop shares the CPU.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        context_length: int,
        max_batch_size: int,
        deliver: Deliver,
        num_threads: int | None = None,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        on_pass: Callable[[str, int, int], None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # Called after every forward pass with (kind "prefill" | "decode", prompt tokens per row
        # or rows of that pass, rows already decoding at that moment): tests and benchmarks.
        self.on_pass = on_pass
        self.model = model
        self.num_threads = num_threads  # torch intra-op threads of the worker (None: inherit)
        self.deliver = deliver
        self._outbox: list[tuple[Request, Event]] = []  # worker thread only
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos_list = sorted(self.eos_ids)
        # OpenAI's logits controls and structured outputs (logits_processing.py).
        vocab_size = getattr(model.config, "vocab_size", None) or len(tokenizer)
        self._controls = ControlsFactory(tokenizer, vocab_size, self._eos_list, device)
        self._token_text = token_text_cache(tokenizer)
        self.steps = 0  # decode steps run so far
        self.prefill_passes = 0  # prefill forward passes (several prompts may share one)
        self.groups_joined = 0  # prefill groups that joined the batch
        # (reason, `steps` at that moment) of the latest request to end: lets tests and the
        # benchmark see exactly when a cancelled request left, whatever the event loop's lag.
        self.last_finished: tuple[str, int] | None = None
        self.fatal_error: BaseException | None = None
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = 0  # submitted and not yet finished (pending + in the batch)
        self._stopped = False
        # Batch state, touched only by the worker thread:
        self._batch = BatchCache()  # the decoding requests (`rows`), their KV cache and mask
        self._prefilling: PrefillGroup | None = None
        self._batchable = cache_supports_row_surgery(new_cache(model))
        # Sessions' KV kept between turns (None: off; needs row surgery).
        self.prefix_cache = prefix_cache if self._batchable else None

    # --- called from any thread ---

    @property
    def running(self) -> int:
        return self._running

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stopped:
                raise RuntimeError("the engine is stopped")
            self._pending.append(request)
            self._running += 1
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Ask the worker to drop `request` before its next step (no-op once finished)."""
        request.cancelled.set()
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread between two steps; its result comes in the future.

        Other torch work in the process belongs here: every thread that runs torch operators
        gets its own OpenMP team, and once a process has more OpenMP threads than cores,
        libgomp stops spinning between parallel regions for all of them (measured on 2 cores:
        a decode stream became ~1.7x slower after one `generate` on another thread).
        """
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the engine is stopped")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    # --- the worker thread ---

    def run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)  # per thread with OpenMP: set it here
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as exc:  # keep the reason for check_health, fail everyone
            logger.exception("engine worker died")
            self.fatal_error = exc
            with self._cond:
                self._stopped = True  # later submits fail at once instead of waiting forever
            self._fail_all(f"engine worker died: {exc!r}")
            raise
        finally:
            self._flush()

    def _iterate(self) -> bool:
        """One scheduler iteration: admit a new prefill group (when none is in progress), run
        pending calls, one chunk of that group's prefill, then one decode step of the batch."""
        self._drop_cancelled()  # first, so that their slots count as free for admission below
        with self._cond:
            while not (
                self._stopped
                or self._pending
                or self._batch.rows
                or self._calls
                or self._prefilling
            ):
                self._cond.wait()
            if self._stopped:
                self._fail_all("engine stopped")
                for _, future in self._calls:
                    future.cancel()
                return False
            calls, self._calls = list(self._calls), deque()
            capacity = self.max_batch_size if self._batchable else 1
            occupied = len(self._batch.rows)
            if self._prefilling is not None:
                occupied += len(self._prefilling.requests)
            admitted: list[Request] = []
            for request in list(self._pending):
                if request.cancelled.is_set():
                    self._pending.remove(request)
                    self._finish_locked(request, StreamEnd("cancelled"))
                elif self._prefilling is None and occupied + len(admitted) < capacity:
                    # Everything that arrived since the last group started forms the next one.
                    self._pending.remove(request)
                    admitted.append(request)
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
        if admitted:
            self._prefilling = self._start_prefill(admitted)
        if self._prefilling is not None and self._prefill_chunk():
            self._flush()  # first tokens go out now, not after the next decode step
        if self._batch.rows:
            self._decode_step()
        self._flush()
        return True

    def _emit(self, request: Request, event: Event) -> None:
        self._outbox.append((request, event))

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self.deliver(batch)
        except Exception:  # a consumer that is gone must not take the worker down
            logger.exception("could not deliver stream events")

    def _start_prefill(self, requests: list[Request]) -> PrefillGroup | None:
        """Tokenize newly admitted prompts into one left-padded group (None if none is valid).

        Requests that arrive together (a burst of users) share each prefill pass instead of one
        pass each: fewer, larger matrix products, so a burst's first tokens come sooner.
        """
        ready: list[tuple[Request, list[int]]] = []
        for request in requests:
            try:
                ids = request.start(self.tokenizer, self.context_length, self.device)
                if request.spec is not None:
                    request.controls = self._controls(request.spec)
                ready.append((request, ids))
            except Exception as exc:  # fails this request only
                self._finish(request, StreamEnd("error", str(exc) or repr(exc)))
        if not ready:
            return None
        prefixes = [take_prefix(self.prefix_cache, request, ids) for request, ids in ready]
        ready = [(r, ids[r.reused :]) for r, ids in ready]
        cache, prefix_mask = group_cache(new_cache(self.model), prefixes, self.device)
        pad_id = self.tokenizer.pad_token_id or 0
        return PrefillGroup.left_padded(ready, pad_id, self.device, cache, prefix_mask)

    def _prefill_chunk(self) -> bool:
        """Run the next chunk of the group's prompts; after the last one, emit the first tokens
        and let the group join the batch. True when the group is done (joined or failed).

        A chunk covers `prefill_chunk_tokens` columns of every row, so its cost grows with the
        number of newcomers, about one decode step's worth each. A lone prompt that fits one
        chunk runs exactly as an unchunked prefill (no padding, no mask).
        """
        group = self._prefilling
        assert group is not None
        if all(r.cancelled.is_set() for r in group.requests):
            for request in group.requests:
                self._finish(request, StreamEnd("cancelled"))
            self._prefilling = None
            return True
        rows = len(group.requests)
        start = group.done
        end = min(group.width, start + max(1, self.prefill_chunk_tokens))
        try:
            out = self.model(
                input_ids=group.input_ids[:, start:end],
                attention_mask=group.mask[:, : group.prefix + end] if group.padded else None,
                position_ids=(
                    (group.mask.cumsum(dim=1) - 1).clamp(min=0)[
                        :, group.prefix + start : group.prefix + end
                    ]
                    if group.padded
                    else None
                ),
                past_key_values=group.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.prefill_passes += 1
            if self.on_pass is not None:
                self.on_pass("prefill", end - start, len(self._batch.rows))
            group.done = end
            if end < group.width:
                return False
            tokens, scores = next_tokens(out.logits[:, -1, :], group.requests, self._eos_list)
        except Exception as exc:
            logger.exception("prefill failed")
            for request in group.requests:
                self._finish(request, StreamEnd("error", f"prefill failed: {exc!r}"))
            self._prefilling = None
            return True
        self._prefilling = None
        keep: list[int] = []
        for row, (request, token) in enumerate(zip(group.requests, tokens, strict=True)):
            if request.cancelled.is_set():
                self._finish(request, StreamEnd("cancelled"))
            elif self._accept_token(request, token, scores[row] if scores else None):
                keep.append(row)
        if not keep:
            return True
        mask, cache = group.mask, group.cache
        if len(keep) < rows:
            mask = keep_rows(cache, mask, torch.tensor(keep, device=self.device))
        self._batch.join([group.requests[row] for row in keep], cache, mask)
        self.groups_joined += 1
        return True

    def _decode_step(self) -> None:
        active = self._batch.rows
        batch = len(active)
        input_ids = torch.tensor([[r.last_token] for r in active], device=self.device)
        # The token fed now sits right after each row's real tokens (padding is not counted).
        positions = self._batch.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self._batch.mask, self._batch.mask.new_ones(batch, 1)], dim=1)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._batch.cache,
                use_cache=True,
            )
        except Exception as exc:
            logger.exception("decode step failed")
            self._fail_active(f"decode step failed: {exc!r}")
            return
        self.steps += 1
        if self.on_pass is not None:
            self.on_pass("decode", batch, batch)
        self._batch.mask = mask
        tokens, scores = next_tokens(out.logits[:, -1, :], active, self._eos_list)
        keep: list[int] = []
        for row, (request, token) in enumerate(zip(active, tokens, strict=True)):
            if self._accept_token(request, token, scores[row] if scores else None):
                keep.append(row)
        keep_prefixes(self.prefix_cache, self._batch, [r for r in range(batch) if r not in keep])
        self._batch.retain(keep)

    def _accept_token(
        self, request: Request, token: int | Exception, scores: RowScores | None = None
    ) -> bool:
        """Stream `token` for `request`; False when the request is over (and finished).

        A failure here (sampling or detokenizing this row) ends this request with an error;
        the other rows of the batch go on.
        """
        try:
            if isinstance(token, Exception):
                raise token
            return self._accept_token_unguarded(request, token, scores)
        except Exception as exc:
            logger.exception("request failed while sampling or detokenizing")
            self._finish(request, StreamEnd("error", f"sampling failed: {exc!r}"))
            return False

    def _accept_token_unguarded(
        self, request: Request, token: int, scores: RowScores | None
    ) -> bool:
        request.generated += 1
        request.last_token = token
        reason = stop_reason(
            token,
            request.generated,
            request.prompt_len,
            request.max_new_tokens,
            self.eos_ids,
            self.context_length,
        )
        if request.controls is not None:
            request.controls.observe(token, reason == "eos")
            if request.controls.complete and reason != "eos":
                reason = "grammar"  # the value is whole, even if the budget ends here too
        if reason != "eos":  # the end-of-sequence token is neither text nor counted
            if scores is not None:
                request.token_logprobs.append(scores.as_token_logprob(token, self._token_text))
            text = request.detokenizer.push(token)
            if text:
                self._emit(request, request.chunk(text))
        if reason is None:
            return True
        # The last chunk, always (empty when nothing is left): it carries the finish reason.
        self._emit(request, request.chunk(request.detokenizer.flush(), FINISH_REASONS[reason]))
        self._finish(request, StreamEnd(reason))
        return False

    def _drop_cancelled(self) -> None:
        active = self._batch.rows
        keep = [i for i, r in enumerate(active) if not r.cancelled.is_set()]
        if len(keep) == len(active):
            return
        for request in active:
            if request.cancelled.is_set():
                self._finish(request, StreamEnd("cancelled"))
        # A cut answer keeps what was fed; the next turn reuses only what its prompt repeats.
        keep_prefixes(
            self.prefix_cache, self._batch, [i for i in range(len(active)) if i not in keep]
        )
        self._batch.retain(keep)

    def _fail_active(self, message: str) -> None:
        for request in self._batch.rows:
            self._finish(request, StreamEnd("error", message))
        self._batch.retain([])

    def _fail_all(self, message: str) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            for request in pending:
                self._finish_locked(request, StreamEnd("error", message))
        group, self._prefilling = self._prefilling, None
        for request in group.requests if group is not None else []:
            self._finish(request, StreamEnd("error", message))
        self._fail_active(message)

    def _finish(self, request: Request, end: StreamEnd) -> None:
        with self._cond:
            self._finish_locked(request, end)

    def _finish_locked(self, request: Request, end: StreamEnd) -> None:
        self._running -= 1
        self.last_finished = (end.reason, self.steps)
        self._emit(request, end)
