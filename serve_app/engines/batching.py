"""Continuous batching over a Hugging Face causal LM's KV cache, in one worker thread.

Every concurrent stream of an engine shares one forward pass per decode step. Requests that
arrived since the last prefill started form one group, left-padded to a common width; its
prompts run through the model `PREFILL_CHUNK_TOKENS` tokens per row at a time, one chunk
between two decode steps, so a stream that is already decoding waits for about one decode
step's worth of prefill per newcomer between two of its tokens, however long the prompts.
After its last chunk the group's first tokens go out and its rows join the batch; a finished
or cancelled request leaves before the next step. The batch keeps one `DynamicCache` whose
rows are left-padded to a common length; an attention mask hides
the padding and each row carries its own position ids.

Why not transformers' own `ContinuousBatchingManager` (transformers 5.23, `generate_batch` /
`init_continuous_batching`)? Measured on this 2-core CPU box with SmolLM2-135M float32, 8 chat
prompts, greedy, 64 new tokens, each variant alone in its own process: 44-71 tok/s aggregate
for the manager against 119-126 tok/s for this scheduler (a static `model.generate` batch of 8
makes ~130). Its paged KV cache, block tables and per-step bookkeeping are built for GPUs
(flash/paged attention, CUDA graphs) and cost more than they save on CPU. It also fixes
`do_sample` for the whole manager (greedy and sampled requests cannot share a batch) and honours
per-request temperature/top-k/top-p only when the global config enables them, while ChatStream
needs per-request params. Its greedy output did match ours token for token. A left-padded
DynamicCache keeps decode steps exactly the shape `generate` uses, so a step costs what a
static batch step costs.

Everything that does not need the model (sampling, stop checks, incremental detokenization,
cache row surgery) is a plain function or a small class, testable on its own.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.config import GenerationParams
from serve_app.engines.base import GeneratedChunk
from serve_app.engines.chat_tokens import prompt_token_ids

logger = logging.getLogger(__name__)

# --- sampling and stopping (pure) -------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (1-D) with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None = None
) -> int:
    """The next token id from one row of logits: argmax when temperature is 0, else sampled."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits.float() / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_tokens(
    logits: torch.Tensor, params: Sequence[GenerationParams]
) -> list[int | Exception]:
    """Next token ids for a batch of logit rows, each with its own parameters.

    Greedy rows share one argmax and a single device-to-host copy (on a GPU, one sync per step
    rather than one per row); only sampled rows are handled one by one. A row whose sampling
    fails gets the exception in its place: it fails that request only, never the batch.
    """
    tokens: list[int | Exception] = torch.argmax(logits, dim=-1).tolist()
    for row, row_params in enumerate(params):
        if row_params.temperature != 0.0:
            try:
                tokens[row] = sample_token(logits[row], row_params)
            except Exception as exc:  # e.g. non-finite logits in that row only
                tokens[row] = exc
    return tokens


def stop_reason(
    token_id: int,
    num_generated: int,
    prompt_len: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    context_length: int,
) -> str | None:
    """Why generation ends after `token_id` (the `num_generated`-th new token), or None."""
    if token_id in eos_ids:
        return "eos"
    if num_generated >= max_new_tokens:
        return "length"
    if prompt_len + num_generated >= context_length:
        return "context"
    return None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding tokens one by one breaks multi-byte characters split over several byte-level
    tokens and drops the spaces some tokenizers merge into the next token. Like TGI/vLLM we
    decode a short window of recent ids and emit only what the newest ids add, holding back
    text that ends in an incomplete UTF-8 sequence (U+FFFD) until it completes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


# --- KV cache rows ----------------------------------------------------------------------------


def cache_supports_row_surgery(cache: Any) -> bool:
    """Only plain full-attention layers can be left-padded and merged row by row.

    Sliding-window or indexed layers keep extra per-sequence state; a model with them runs one
    request at a time (still correct, just not batched).
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(t: torch.Tensor, amount: int) -> torch.Tensor:
    """Pad dim -2 (sequence) of a [batch, heads, seq, dim] tensor with `amount` zeros in front."""
    if amount == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], amount, t.shape[3])
    return torch.cat([pad, t], dim=-2)


def merge_rows(
    batch_cache: Any, batch_mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor
) -> torch.Tensor:
    """Append the rows of `new_cache` to `batch_cache` (in place); returns the merged mask.

    Both are left-padded to the longer of the two so every row's newest token sits in the last
    column; the mask (1 = real token) keeps padding invisible to attention.
    """
    batch_len, new_len = batch_mask.shape[1], new_mask.shape[1]
    length = max(batch_len, new_len)
    for dst, src in zip(batch_cache.layers, new_cache.layers, strict=True):
        dst.keys = torch.cat(
            [_left_pad(dst.keys, length - batch_len), _left_pad(src.keys, length - new_len)], dim=0
        )
        dst.values = torch.cat(
            [_left_pad(dst.values, length - batch_len), _left_pad(src.values, length - new_len)],
            dim=0,
        )
    pad = batch_mask.new_zeros
    return torch.cat(
        [
            torch.cat([pad(batch_mask.shape[0], length - batch_len), batch_mask], dim=1),
            torch.cat([pad(new_mask.shape[0], length - new_len), new_mask], dim=1),
        ],
        dim=0,
    )


def keep_rows(cache: Any, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only rows `keep` of the cache (in place) and drop columns that are now all padding.

    Trimming matters: without it a long finished request would leave every later step paying
    attention over its padding.
    """
    mask = mask.index_select(0, keep)
    first_used = int(torch.nonzero(mask.any(dim=0))[0])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, keep)[:, :, first_used:, :]
        layer.values = layer.values.index_select(0, keep)[:, :, first_used:, :]
    return mask[:, first_used:]


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# --- requests and the scheduler ---------------------------------------------------------------


@dataclass
class StreamEnd:
    """The last event of a request: `error` is None when it finished normally."""

    reason: str
    error: str | None = None


Event = GeneratedChunk | StreamEnd


@dataclass(eq=False)
class Request:
    prompt: str | list[int]
    params: GenerationParams
    consumer: Any = None  # where its events go; opaque here, read by the `deliver` callback
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the worker:
    prompt_len: int = 0
    max_new_tokens: int = 0
    generated: int = 0
    last_token: int = 0
    pending_tokens: int = 0  # tokens whose text is still held back by the detokenizer
    detokenizer: IncrementalDetokenizer | None = None


@dataclass(eq=False)
class PrefillGroup:
    """Requests admitted together, their prompts left-padded to one width and run through the
    model a chunk of columns at a time (between decode steps) into their own KV cache."""

    requests: list[Request]
    input_ids: torch.Tensor  # [rows, width]
    mask: torch.Tensor  # [rows, width], 1 = real token
    padded: bool
    cache: Any
    done: int = 0  # columns already run through the model

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


Deliver = Callable[[list[tuple[Request, Event]]], None]

# Prompt tokens per request per prefill pass. Measured on the 2-core CPU with the 135M model in
# bfloat16: a batch-8 decode step took 68 ms, a 64-token prefill 95 ms, 128 tokens 127 ms, 256
# tokens 205 ms. So a decoding stream waits about one step's worth of prefill per newcomer in
# the group between two of its tokens, however long the prompts; and a burst of short prompts
# (8 x ~35 tokens) still goes through in one pass, which is what keeps its first tokens early.
PREFILL_CHUNK_TOKENS = 64


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
        self._active: list[Request] = []
        self._prefilling: PrefillGroup | None = None
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [batch, cache_len], 1 = real token
        self._batchable = cache_supports_row_surgery(_new_cache(model))

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
                self._stopped or self._pending or self._active or self._calls or self._prefilling
            ):
                self._cond.wait()
            if self._stopped:
                self._fail_all("engine stopped")
                for _, future in self._calls:
                    future.cancel()
                return False
            calls, self._calls = list(self._calls), deque()
            capacity = self.max_batch_size if self._batchable else 1
            occupied = len(self._active)
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
        if self._active:
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
                ids = (
                    list(request.prompt)  # token ids from the ingress (engines/chat_tokens.py)
                    if isinstance(request.prompt, list)
                    else prompt_token_ids(self.tokenizer, request.prompt)
                )
            except Exception as exc:
                self._finish(request, StreamEnd("error", f"tokenization failed: {exc!r}"))
                continue
            if len(ids) >= self.context_length:
                message = (
                    f"prompt of {len(ids)} tokens does not fit the context of {self.context_length}"
                )
                self._finish(request, StreamEnd("error", message))
                continue
            request.prompt_len = len(ids)
            request.max_new_tokens = request.params.max_new_tokens
            request.detokenizer = IncrementalDetokenizer(self.tokenizer)
            ready.append((request, ids))
        if not ready:
            return None
        width = max(len(ids) for _, ids in ready)
        pad_id = self.tokenizer.pad_token_id or 0
        return PrefillGroup(
            requests=[r for r, _ in ready],
            input_ids=torch.tensor(
                [[pad_id] * (width - len(ids)) + ids for _, ids in ready], device=self.device
            ),
            mask=torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for _, ids in ready],
                device=self.device,
            ),
            padded=any(len(ids) < width for _, ids in ready),
            cache=_new_cache(self.model),
        )

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
                attention_mask=group.mask[:, :end] if group.padded else None,
                position_ids=(
                    (group.mask.cumsum(dim=1) - 1).clamp(min=0)[:, start:end]
                    if group.padded
                    else None
                ),
                past_key_values=group.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.prefill_passes += 1
            if self.on_pass is not None:
                self.on_pass("prefill", end - start, len(self._active))
            group.done = end
            if end < group.width:
                return False
            tokens = sample_tokens(out.logits[:, -1, :], [r.params for r in group.requests])
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
            elif self._accept_token(request, token):
                keep.append(row)
        if not keep:
            return True
        mask, cache = group.mask, group.cache
        if len(keep) < rows:
            mask = keep_rows(cache, mask, torch.tensor(keep, device=self.device))
        if not self._active:
            self._cache, self._mask = cache, mask
        else:
            self._mask = merge_rows(self._cache, self._mask, cache, mask)
        self._active.extend(group.requests[row] for row in keep)
        self.groups_joined += 1
        return True

    def _decode_step(self) -> None:
        batch = len(self._active)
        input_ids = torch.tensor([[r.last_token] for r in self._active], device=self.device)
        # The token fed now sits right after each row's real tokens (padding is not counted).
        positions = self._mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        except Exception as exc:
            logger.exception("decode step failed")
            self._fail_active(f"decode step failed: {exc!r}")
            return
        self.steps += 1
        if self.on_pass is not None:
            self.on_pass("decode", batch, batch)
        self._mask = mask
        tokens = sample_tokens(out.logits[:, -1, :], [r.params for r in self._active])
        keep: list[int] = []
        for row, (request, token) in enumerate(zip(self._active, tokens, strict=True)):
            if self._accept_token(request, token):
                keep.append(row)
        self._retain(keep)

    def _accept_token(self, request: Request, token: int | Exception) -> bool:
        """Stream `token` for `request`; False when the request is over (and finished).

        A failure here (sampling or detokenizing this row) ends this request with an error;
        the other rows of the batch go on.
        """
        try:
            if isinstance(token, Exception):
                raise token
            return self._accept_token_unguarded(request, token)
        except Exception as exc:
            logger.exception("request failed while sampling or detokenizing")
            self._finish(request, StreamEnd("error", f"sampling failed: {exc!r}"))
            return False

    def _accept_token_unguarded(self, request: Request, token: int) -> bool:
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
        if reason != "eos":
            request.pending_tokens += 1
            text = request.detokenizer.push(token)
            if text:
                self._emit(request, GeneratedChunk(text, request.pending_tokens))
                request.pending_tokens = 0
        if reason is None:
            return True
        tail = request.detokenizer.flush()
        if tail or request.pending_tokens:
            self._emit(request, GeneratedChunk(tail, request.pending_tokens))
        self._finish(request, StreamEnd(reason))
        return False

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self._active) if not r.cancelled.is_set()]
        if len(keep) == len(self._active):
            return
        for request in self._active:
            if request.cancelled.is_set():
                self._finish(request, StreamEnd("cancelled"))
        self._retain(keep)

    def _retain(self, keep: list[int]) -> None:
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = keep_rows(self._cache, self._mask, index)

    def _fail_active(self, message: str) -> None:
        for request in self._active:
            self._finish(request, StreamEnd("error", message))
        self._active, self._cache, self._mask = [], None, None

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
