"""One admitted request from admission to its single outcome, and the bookkeeping after it.

`Exchange.finish` runs exactly once, whatever ended the stream: it frees the engine's slot,
decides the outcome and hands the rest to `Bookkeeping.complete`, which runs in a task of its
own (a cancelled request still completes its bookkeeping): release the session's turn and save
the answer, record the outcome, call the callback - each step even if an earlier one failed.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentResponseGenerator
from ray.serve.metrics import Counter
from starlette.requests import Request

from serve_app.outcomes import LOST_OUTCOME, LOST_REASON, Outcome, classify_outcome
from serve_app.session_state import SessionLimits, apply_change, finish_turn
from serve_app.sessions import SessionView
from serve_app.stores import StateStore

logger = logging.getLogger("ray.serve")

Callback = Callable[[Request, str], Any]

# Each ingress replica re-sends its load this often; a report counts for three intervals, so
# the figures of a replica that died leave /load within that time.
LOAD_REPORT_INTERVAL_SEC = 5.0
# A replica whose report expired this long ago is gone: its open requests are closed.
LOST_GRACE_SEC = 3 * LOAD_REPORT_INTERVAL_SEC
# A bookkeeping write that failed because the store was down is retried for this long.
STORE_RETRY_WINDOW_SEC = 300.0


@dataclass(frozen=True)
class Turn:
    """The session turn an exchange answers (the session's lock is held under `turn_id`)."""

    turn_id: str
    epoch: int
    user_message: dict[str, Any] | None  # None for regenerate
    kept_messages: int = 0  # the newest messages that fitted the prompt (older ones go)


@dataclass(eq=False)
class Exchange:
    """One admitted request. `finish` is safe to call from any thread, any number of times."""

    request: Request
    request_id: str
    record_id: str  # the server's own id: counts the outcome once, even if the write is retried
    message_id: str
    session: SessionView | None  # None on stateless routes (/v1)
    turn: Turn | None
    model_stream: DeploymentResponseGenerator
    callback: Callback | None
    bookkeeping: Bookkeeping
    admitted_at: float = field(default_factory=time.monotonic)
    holds_slot: bool = False
    sent: list[str] = field(default_factory=list)
    completed: bool = False
    stopped_early: bool = False
    finished: bool = False
    # Set once the session's turn is released (and the answer saved): a client that got the
    # whole answer then finds it in /history, and may send its next turn at once.
    turn_released: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        """The client has the whole answer it asked for (e.g. a stop string matched): the
        outcome is success, and the rest of the generation is cancelled."""
        self.completed = True
        self.stopped_early = True

    def finish(self, exc: BaseException | None) -> None:
        """Decide the outcome (once) and start the bookkeeping. Never awaits: it is called from
        `finally` blocks of cancelled tasks, and from garbage collection in any thread."""
        if not self.bookkeeping.on_loop_thread():
            self.bookkeeping.call_soon(self.finish, exc)
            return
        if self.finished:
            return
        self.finished = True
        if self.holds_slot:
            self.bookkeeping.load_board.change(ongoing=-1)
        else:
            self.bookkeeping.load_board.change(queued=-1)
        outcome = classify_outcome(len(self.sent), self.completed, exc)
        if outcome is Outcome.UNKNOWN_ERROR_OCCURRED:
            logger.error("request %s failed: %r", self.request_id, exc)
        self.bookkeeping.spawn(self.bookkeeping.complete(self, outcome))
        if not self.completed or self.stopped_early:
            self._cancel_generation()

    def _cancel_generation(self) -> None:
        """Free the engine's slot at once. Last, and guarded: Ray's `cancel()` fetches the
        call's replica assignment and re-raises how that ended (e.g. the very error that ended
        the stream); raised here, it used to skip the load board and the bookkeeping above,
        leaving a phantom waiting request on /load and the session's turn taken."""
        try:
            self.model_stream.cancel()
        except Exception as error:
            logger.debug("request %s: cancel() raised %r", self.request_id, error)


class LoadBoard:
    """This ingress replica's admitted requests: waiting for a slot, or holding one.

    Changed only on the event loop's thread. Each change is reported to the store as absolute
    figures with a sequence number (a late report never overwrites a newer one) and an expiry
    (a dead replica's figures drop out); a heartbeat re-sends them."""

    def __init__(self, store: StateStore, replica_id: str, spawn: Callable[[Any], None]) -> None:
        self._store = store
        self._replica_id = replica_id
        self._spawn = spawn
        self._seq = 0
        self.queued = 0
        self.ongoing = 0

    def change(self, queued: int = 0, ongoing: int = 0) -> None:
        self.queued += queued
        self.ongoing += ongoing
        self._spawn(self.report())

    async def report(self) -> bool:
        """Send the current figures; False if the store could not take them."""
        self._seq += 1
        expires_at = time.time() + 3 * LOAD_REPORT_INTERVAL_SEC
        try:
            await self._store.report_load(
                self._replica_id, self._seq, self.ongoing, self.queued, expires_at
            )
        except Exception:  # store down: the heartbeat sends it again
            return False
        return True


class Bookkeeping:
    """Everything that happens after an exchange's outcome is decided, in background tasks
    that the request's cancellation cannot reach."""

    def __init__(
        self,
        store: StateStore,
        limits: SessionLimits,
        replica_id: str,
        callback_timeout_sec: float = 30.0,
        callback_threads: int = 8,
    ) -> None:
        self.store = store
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks: set[asyncio.Task] = set()
        self._callback_timeout_sec = callback_timeout_sec
        self._callback_threads = ThreadPoolExecutor(
            callback_threads, thread_name_prefix="chatstream-callback"
        )
        self.load_board = LoadBoard(store, replica_id, self.spawn)
        self._heartbeat = self.spawn(self._keep_alive())
        self._outcomes = Counter(
            "chatstream_outcomes_total",
            description="Admitted requests by outcome",
            tag_keys=("outcome",),
        )
        self._store_failures = Counter(
            "chatstream_store_write_failures_total",
            description="Bookkeeping writes that failed because the state store was "
            "unreachable (each is retried in the background)",
            tag_keys=("operation",),
        )
        self._callback_failures = Counter(
            "chatstream_callback_failures_total",
            description="Completion callbacks that raised or timed out (each still counts as "
            "its request's one call)",
            tag_keys=("reason",),
        )

    async def _keep_alive(self) -> None:
        """Re-send this replica's load (its sign of life), and close the requests of replicas
        that show none: their ingress died before deciding an outcome. Only after two reports
        in a row went through, so that after a store outage every live replica has spoken."""
        reports_in_a_row = 0
        while True:
            await asyncio.sleep(LOAD_REPORT_INTERVAL_SEC)
            reports_in_a_row = reports_in_a_row + 1 if await self.load_board.report() else 0
            if reports_in_a_row < 2:
                continue
            try:
                lost = await self.store.sweep_lost_requests(LOST_GRACE_SEC)
            except Exception as exc:
                logger.warning("could not look for requests of lost ingress replicas: %r", exc)
                continue
            if lost:
                self._outcomes.inc(lost, tags={"outcome": LOST_OUTCOME})
                logger.error(
                    "closed %d requests of an ingress replica that died as %s (%s)",
                    lost,
                    LOST_OUTCOME,
                    LOST_REASON,
                )

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        self._loop.call_soon_threadsafe(function, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        # A fresh context: the request's context (and its cancellation) is not inherited.
        task = self._loop.create_task(coro, context=contextvars.Context())
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)
        return task

    async def complete(self, exchange: Exchange, outcome: Outcome) -> None:
        """Release the turn (saving the answer when the client got some of it), record the
        outcome, call the callback. Each step runs even if an earlier one failed, so the
        callback fires exactly once."""
        if exchange.turn is not None and exchange.session is not None:
            await self._finish_turn(exchange, outcome)
        exchange.turn_released.set()
        self._outcomes.inc(tags={"outcome": outcome.value})
        record = (exchange.record_id, exchange.request_id, outcome.value)
        record_outcome = self.store.record_outcome
        try:
            await record_outcome(*record)
        except Exception as exc:
            self._write_later("record_outcome", exchange.request_id, exc, record_outcome, *record)
        if exchange.callback is not None:
            await self._call_back(exchange, outcome)

    async def _call_back(self, exchange: Exchange, outcome: Outcome) -> None:
        """The callback, once: a sync one on the callback threads (never on the event loop),
        either kind bounded by the timeout. One that fails or times out still had its call."""
        callback, request = exchange.callback, exchange.request
        try:
            if inspect.iscoroutinefunction(callback):
                call = callback(request, outcome.value)
            else:
                call = self._loop.run_in_executor(
                    self._callback_threads, callback, request, outcome.value
                )
            result = await asyncio.wait_for(call, self._callback_timeout_sec)
            if inspect.isawaitable(result):  # a sync function that returned an awaitable
                await asyncio.wait_for(result, self._callback_timeout_sec)
        except TimeoutError:
            self._callback_failures.inc(tags={"reason": "timeout"})
            logger.error(
                "request %s: the completion callback did not return within %s s",
                exchange.request_id,
                self._callback_timeout_sec,
            )
        except Exception:
            self._callback_failures.inc(tags={"reason": "error"})
            logger.exception("request %s: the completion callback failed", exchange.request_id)

    async def drain(self, timeout_sec: float) -> None:
        """On shutdown: wait (bounded) for bookkeeping and callbacks still under way."""
        pending = [t for t in self._tasks if t is not self._heartbeat]
        if pending:
            logger.info("waiting up to %s s for %d bookkeeping tasks", timeout_sec, len(pending))
            await asyncio.wait(pending, timeout=timeout_sec)
        self._heartbeat.cancel()

    async def _finish_turn(self, exchange: Exchange, outcome: Outcome) -> None:
        """Release the session's turn, saving the answer if the client got some of it."""
        turn = exchange.turn
        answer = None
        if exchange.sent and outcome in (
            Outcome.SUCCESS,
            Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING,
        ):
            answer = {
                "role": "assistant",
                "content": "".join(exchange.sent),
                "message_id": exchange.message_id,
            }
        change = finish_turn(
            turn.turn_id,
            turn.epoch,
            user_message=turn.user_message,
            regenerate=turn.user_message is None,
            answer=answer,
            keep_messages=turn.kept_messages,
        )
        view = exchange.session
        change_session = functools.partial(self.store.change_session, view.session_id)
        try:
            view.update(await change_session(change))
        except Exception as exc:
            self._write_later("finish_turn", exchange.request_id, exc, change_session, change)
            # The callback still sees the conversation as it will be.
            view.update(apply_change(view.record, change, self._limits))

    def release_turn(self, session_id: str, turn_id: str) -> None:
        """Release a session's turn in the background, retried while the store is down."""
        change = finish_turn(turn_id, epoch=-1)  # no answer: the epoch does not matter

        async def release() -> None:
            try:
                await self.store.change_session(session_id, change)
            except Exception as exc:
                write = functools.partial(self.store.change_session, session_id)
                self._write_later("release_turn", turn_id, exc, write, change)

        self.spawn(release())

    def _write_later(
        self,
        operation: str,
        request_id: str,
        exc: Exception,
        write: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
    ) -> None:
        """Log and count a failed bookkeeping write, and retry it in the background."""
        self._store_failures.inc(tags={"operation": operation})
        logger.error(
            "request %s: %s could not be written to the state store (%r); retrying for up to %d s",
            request_id,
            operation,
            exc,
            STORE_RETRY_WINDOW_SEC,
        )
        self.spawn(self._retry(operation, request_id, write, *args))

    async def _retry(
        self,
        operation: str,
        request_id: str,
        write: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
    ) -> None:
        """Retry an idempotent write (each is: see session_state and StateStore) until the
        store is back, for a bounded time."""
        deadline = time.monotonic() + STORE_RETRY_WINDOW_SEC
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await write(*args)
                logger.info("request %s: %s written after a retry", request_id, operation)
                return
            except Exception:
                delay = min(delay * 2, 10.0)
        logger.error("request %s: gave up writing %s to the state store", request_id, operation)
