"""One admission lifecycle for every route: admit -> relay -> finish.

`admit` opens the request in the durable ledger, calls the model deployment and waits for a
generation slot (429 when the queue is full) and the answer's first chunk. From then on the
request is admitted: `finish` decides its one outcome, whatever ends the stream (the answer
sent, the client gone, the engine failing, the response never sent at all), frees the engine's
slot and hands the rest to the bookkeeping. Routes and services call this module; it never
calls back up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse

from serve_app import metrics
from serve_app.access import Caller
from serve_app.api_keys import ANONYMOUS_KEY_ID
from serve_app.bookkeeping import Bookkeeping
from serve_app.choices import ChoiceStreams, call_apart, split_choices
from serve_app.exchange import Callback, Exchange, Turn
from serve_app.fair_queue import OVER_SHARE, FairQueue, QueueRefused
from serve_app.liveness import LoadBoard
from serve_app.model_contract import AnswerChunk, GenerationRequest, SlotAcquired, merge_chunks
from serve_app.outcomes import Outcome, classify_outcome, is_client_disconnect
from serve_app.refusals import Refusal, store_unavailable
from serve_app.sessions import SessionView
from serve_app.stores import StateStore, StoreUnavailable

logger = logging.getLogger("ray.serve")

# How long the end of a whole answer waits for the session to be saved.
TURN_SAVE_WAIT_SEC = 5.0


class GenerationFailed(Exception):
    """The engine failed before the first chunk (the outcome is already recorded)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id  # the request's key in the ledger


class Encoder(Protocol):
    """How a route puts the answer on the wire."""

    def chunk(self, exchange: Exchange, chunk: AnswerChunk) -> str:
        """What to send for `chunk` ("" sends nothing)."""

    def end(self, exchange: Exchange) -> str:
        """What to send after the last chunk ("" sends nothing)."""

    def error(self) -> str | None:
        """What to send when the engine fails mid-stream (None: cut the connection)."""


def tenant_of(caller: Caller, session: SessionView | None, request: Request) -> str:
    """Whose share a request waits in: its API key; without keys, its session (a chat turn) or
    its client's address (a stateless `/v1` call)."""
    if caller.key_id != ANONYMOUS_KEY_ID:
        return caller.key_id
    if session is not None:
        return "session:" + hashlib.sha256(session.session_id.encode()).hexdigest()[:12]
    return "client:" + (request.client.host if request.client else "unknown")


def metric_tenant(tenant: str) -> str:
    """A tenant as a Prometheus label: key ids as they are, sessions and clients as a kind (one
    series each, however many clients come)."""
    return tenant.split(":", 1)[0] if ":" in tenant else tenant


def queue_refusal(full: Exception, retry_after_s: float) -> Refusal:
    if isinstance(full, QueueRefused) and full.reason == OVER_SHARE:
        return Refusal(
            429,
            OVER_SHARE,
            "this tenant already holds its share of the waiting places; retry later",
            retry_after_s=retry_after_s,
        )
    return Refusal(
        429,
        "too_many_requests",
        "all generation slots and queue places are taken; retry later",
        retry_after_s=retry_after_s,
    )


class Admission:
    """Admits requests to the model deployment and sees each through to its outcome."""

    def __init__(
        self,
        model: DeploymentHandle,
        store: StateStore,
        bookkeeping: Bookkeeping,
        load_board: LoadBoard,
        *,
        replica_id: str,
        retry_after_sec: float,
        fair_queue: FairQueue | None = None,
    ) -> None:
        self._model = model.options(stream=True)
        self._store = store
        self._bookkeeping = bookkeeping
        self.background = bookkeeping.background
        self._load_board = load_board
        self._replica_id = replica_id
        self._retry_after_sec = retry_after_sec
        self.fair_queue = fair_queue or FairQueue(1 << 30, -1)

    async def admit(
        self,
        request: Request,
        caller: Caller,
        generation: GenerationRequest | Sequence[GenerationRequest],
        callback: Callback | None,
        session: SessionView | None = None,
        turn: Turn | None = None,
    ) -> tuple[Exchange, AnswerChunk | None]:
        """Wait for a generation slot and the answer's first chunk (None: the stream ended).
        Several generations (OpenAI's `n` choices) are one request that waits for a slot for
        each; its chunks carry their choice's `index` (choices.py).

        Raises Refusal (429 when the queue is full, 503 when the store is down: not admitted),
        GenerationFailed when the engine failed before the first chunk (outcome recorded), and
        re-raises a client disconnect (outcome recorded)."""
        record_id = uuid.uuid4().hex
        try:  # open in the durable ledger: if this replica dies, a survivor closes it
            request_id = await self._store.open_request(
                record_id, caller.request_id, self._replica_id
            )
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None
        exchange = Exchange(
            request=request,
            caller=caller,
            request_id=request_id,
            record_id=record_id,
            message_id=uuid.uuid4().hex,
            model_stream=None,  # once the fair queue gives this request its turn
            callback=callback,
            session=session,
            turn=turn,
        )
        self._load_board.change(queued=1)
        try:
            tenant = tenant_of(caller, session, request)
            choices = [generation] if isinstance(generation, GenerationRequest) else generation
            exchange.ticket = await self.fair_queue.enter(tenant, places=len(choices))
            metrics.TENANT_QUEUE_WAIT.get().observe(
                exchange.ticket.waited_s, tags={"tenant": metric_tenant(tenant)}
            )
            if len(choices) == 1:
                exchange.model_stream = self._model.generate.remote(choices[0])
            else:
                exchange.model_stream = ChoiceStreams(
                    [call_apart(lambda c=c: self._model.generate.remote(c)) for c in choices]
                )
            slot = await exchange.model_stream.__anext__()
            assert isinstance(slot, SlotAcquired), f"the model's first item was {slot!r}"
            exchange.holds_slot = True
            exchange.prompt_tokens = slot.prompt_tokens
            self._load_board.change(queued=-1, ongoing=1)
            first_chunk = await self.next_chunk(exchange)
        except (BackPressureError, QueueRefused) as full:
            exchange.finished = True  # refused, not admitted: no outcome, no callback
            if exchange.ticket is not None:
                exchange.ticket.release()
            self._load_board.change(queued=-1)
            with contextlib.suppress(StoreUnavailable):
                await self._store.close_request(record_id)
            raise queue_refusal(full, self._retry_after_sec) from None
        except BaseException as exc:
            self.finish(exchange, exc)
            if is_client_disconnect(exc):
                raise
            raise GenerationFailed(exchange.request_id) from exc
        metrics.TIME_TO_FIRST_TOKEN.get().observe(time.monotonic() - exchange.admitted_at)
        return exchange, first_chunk

    @staticmethod
    async def next_chunk(exchange: Exchange) -> AnswerChunk | None:
        """The answer's next chunk with text or a finish reason, or None at its end. Token
        counts and the finish reason are taken into the exchange as they arrive."""
        async for chunk in exchange.model_stream:
            exchange.completion_tokens += chunk.num_tokens
            if chunk.finish_reason is not None:
                exchange.finish_reason = chunk.finish_reason
            # A chunk with only log probabilities (text held back by a stop string) counts.
            if chunk.text or chunk.finish_reason is not None or chunk.logprobs:
                return chunk
        return None

    async def relay(
        self, exchange: Exchange, chunk: AnswerChunk | None, encoder: Encoder
    ) -> AsyncIterator[str]:
        """The answer from `chunk` (admit's first) on, through `encoder`. A piece counts as
        sent once the consumer asks for the next one; the outcome is success once the last
        piece went out."""
        error: BaseException | None = None
        try:
            # Serve's proxy takes chunks without waiting for the client, and on a loaded
            # machine it may pass on a client's leaving late: a disconnect it already passed
            # on is taken here, before the first chunk, so that it counts as "before streaming".
            if chunk is not None and await exchange.request.is_disconnected():
                raise ClientDisconnect()
            try:
                while chunk is not None:
                    piece = encoder.chunk(exchange, chunk)
                    if piece:
                        yield piece
                        exchange.sent.append(chunk.text)  # resumed: it went out
                        exchange.chunks_sent += 1
                    chunk = await self.next_chunk(exchange)
            except Exception as exc:
                failure = encoder.error()
                if failure is None or is_client_disconnect(exc):
                    raise
                self.finish(exchange, exc)  # unknown_error_occurred, recorded now
                yield failure
                return
            tail = encoder.end(exchange)
            if tail:
                yield tail
                exchange.chunks_sent += 1
            await self._completed(exchange)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(exchange, error)

    async def collect(self, exchange: Exchange, chunk: AnswerChunk | None) -> str:
        """The whole answer's text, for a response sent in one piece. On failure the outcome
        is recorded and the error re-raised."""
        return (await self.collect_chunks(exchange, chunk)).text

    async def collect_chunks(self, exchange: Exchange, chunk: AnswerChunk | None) -> AnswerChunk:
        """The whole answer as one chunk (its text, token ids and log probabilities)."""
        chunks = await self._collect(exchange, chunk)
        return merge_chunks(chunks) if chunks else AnswerChunk("", 0)

    async def collect_choices(
        self, exchange: Exchange, chunk: AnswerChunk | None, n: int
    ) -> list[AnswerChunk]:
        """The whole answer of each of the request's `n` choices, by index."""
        return split_choices(await self._collect(exchange, chunk), n)

    async def _collect(self, exchange: Exchange, chunk: AnswerChunk | None) -> list[AnswerChunk]:
        chunks: list[AnswerChunk] = []
        try:
            while chunk is not None:
                chunks.append(chunk)
                chunk = await self.next_chunk(exchange)
        except BaseException as exc:
            self.finish(exchange, exc)
            raise
        return chunks

    async def send_once(
        self, exchange: Exchange, body: bytes, text: str | None = None
    ) -> AsyncIterator[bytes]:
        """A whole answer as one body: success once it went out. `text`: the answer as a
        session turn saves it (default: the body)."""
        try:
            yield body
            exchange.sent.append(body.decode() if text is None else text)
            exchange.chunks_sent += 1
            await self._completed(exchange)
        finally:
            self.finish(exchange, sys.exc_info()[1])

    async def _completed(self, exchange: Exchange) -> None:
        """The whole answer went out: success. The response ends only once a session turn's
        answer is saved (bounded: a slow store must not hold the client), so that what the
        client saw is what the session shows."""
        exchange.completed = True
        self.finish(exchange, None)
        if exchange.turn is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exchange.turn_released.wait(), TURN_SAVE_WAIT_SEC)

    def response(
        self, exchange: Exchange, content: AsyncIterator[Any], **kwargs: Any
    ) -> OutcomeStreamingResponse:
        return OutcomeStreamingResponse(self, exchange, content, **kwargs)

    def finish(self, exchange: Exchange, exc: BaseException | None) -> None:
        """Decide the outcome (once) and start the bookkeeping. Never awaits: it is called from
        `finally` blocks of cancelled tasks, and from garbage collection in any thread."""
        if not self.background.on_loop_thread():
            self.background.call_soon(self.finish, exchange, exc)
            return
        if exchange.finished:
            return
        exchange.finished = True
        if exchange.ticket is not None:
            exchange.ticket.release()  # the model's place goes to the next tenant in turn
        if exchange.holds_slot:
            self._load_board.change(ongoing=-1)
        else:
            self._load_board.change(queued=-1)
        outcome = classify_outcome(exchange.chunks_sent, exchange.completed, exc)
        if outcome is Outcome.UNKNOWN_ERROR_OCCURRED:
            logger.error("request %s failed: %r", exchange.request_id, exc)
        self.background.spawn(self._bookkeeping.complete(exchange, outcome))
        if not exchange.completed:
            self._cancel_generation(exchange)

    @staticmethod
    def _cancel_generation(exchange: Exchange) -> None:
        """Free the engine's slot at once. Last, and guarded: Ray's `cancel()` fetches the
        call's replica assignment and re-raises how that ended (e.g. the very error that ended
        the stream); raised here, it used to skip the load board and the bookkeeping above,
        leaving a phantom waiting request on /load and the session's turn taken."""
        if exchange.model_stream is None:  # it left while waiting in the fair queue
            return
        try:
            exchange.model_stream.cancel()
        except Exception as error:
            logger.debug("request %s: cancel() raised %r", exchange.request_id, error)


class OutcomeStreamingResponse(StreamingResponse):
    """A StreamingResponse that reports how sending ended, even if its body never started."""

    def __init__(
        self,
        admission: Admission,
        exchange: Exchange,
        content: AsyncIterator[Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._admission = admission
        self._exchange = exchange
        # If the request is cancelled after the route returned this response but before the
        # server called it, only garbage collection sees it go: finish the exchange then. The
        # collector may run in any thread, or in the middle of other code on the loop's
        # thread, so the finish is queued on the event loop, never run in place.
        weakref.finalize(
            self,
            admission.background.call_soon,
            admission.finish,
            exchange,
            asyncio.CancelledError("response never sent"),
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        error: BaseException | None = None
        try:
            await super().__call__(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if error is None and not self._exchange.completed:
                error = asyncio.CancelledError("response ended before the answer did")
            self._admission.finish(self._exchange, error)
