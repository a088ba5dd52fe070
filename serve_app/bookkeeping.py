"""Everything that happens once an admitted request's outcome is decided, in a background task
that the request's cancellation cannot reach: release the session's turn (saving the answer),
record the outcome, count the API key's usage and free its stream, call the callback. Each
step runs even if an earlier one failed, so the callback fires exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serve_app import metrics
from serve_app.access import Access
from serve_app.background import Background
from serve_app.exchange import Exchange
from serve_app.outcomes import LOST_OUTCOME, Outcome
from serve_app.session_state import SessionLimits, apply_change, finish_turn
from serve_app.stores import StateStore

logger = logging.getLogger("ray.serve")

# A bookkeeping write that failed because the store was down is retried for this long.
STORE_RETRY_WINDOW_SEC = 300.0


class Bookkeeping:
    """Completes exchanges: the session, the ledger, usage and the callback."""

    def __init__(
        self,
        store: StateStore,
        limits: SessionLimits,
        background: Background,
        access: Access,
        *,
        callback_timeout_sec: float = 30.0,
        callback_threads: int = 8,
    ) -> None:
        self.store = store
        self.background = background
        self._limits = limits
        self._access = access
        self._callback_timeout_sec = callback_timeout_sec
        self._callback_threads = ThreadPoolExecutor(
            callback_threads, thread_name_prefix="chatstream-callback"
        )

    def count_lost(self, lost: int) -> None:
        """Requests of a dead ingress replica, closed by the sweep (serve_app/liveness.py)."""
        metrics.OUTCOMES.get().inc(lost, tags={"outcome": LOST_OUTCOME})

    async def complete(self, exchange: Exchange, outcome: Outcome) -> None:
        if exchange.turn is not None and exchange.session is not None:
            await self._finish_turn(exchange, outcome)
        exchange.turn_released.set()
        metrics.OUTCOMES.get().inc(tags={"outcome": outcome.value})
        record = (exchange.record_id, exchange.request_id, outcome.value)
        record_outcome = self.store.record_outcome
        try:
            await record_outcome(*record)
        except Exception as exc:
            self._write_later("record_outcome", exchange.request_id, exc, record_outcome, *record)
        caller = exchange.caller
        caller.release()
        self._access.finished(
            caller.key_id, outcome.value, exchange.prompt_tokens, exchange.completion_tokens
        )
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
                call = self.background.run_in_executor(
                    self._callback_threads, callback, request, outcome.value
                )
            result = await asyncio.wait_for(call, self._callback_timeout_sec)
            if inspect.isawaitable(result):  # a sync function that returned an awaitable
                await asyncio.wait_for(result, self._callback_timeout_sec)
        except TimeoutError:
            metrics.CALLBACK_FAILURES.get().inc(tags={"reason": "timeout"})
            logger.error(
                "request %s: the completion callback did not return within %s s",
                exchange.request_id,
                self._callback_timeout_sec,
            )
        except Exception:
            metrics.CALLBACK_FAILURES.get().inc(tags={"reason": "error"})
            logger.exception("request %s: the completion callback failed", exchange.request_id)

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
            if turn.answer_meta is not None:
                answer["meta"] = {
                    **turn.answer_meta,
                    "outcome": outcome.value,
                    "prompt_tokens": exchange.prompt_tokens,
                    "completion_tokens": exchange.completion_tokens,
                    "finish_reason": exchange.finish_reason,
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
        """Release a session's turn in the background (a request that was not admitted; no
        answer is saved), retried while the store is down."""
        change = finish_turn(turn_id, epoch=-1)  # no answer: the epoch does not matter

        async def release() -> None:
            try:
                await self.store.change_session(session_id, change)
            except Exception as exc:
                write = functools.partial(self.store.change_session, session_id)
                self._write_later("release_turn", turn_id, exc, write, change)

        self.background.spawn(release())

    def _write_later(
        self,
        operation: str,
        request_id: str,
        exc: Exception,
        write: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
    ) -> None:
        """Log and count a failed bookkeeping write, and retry it in the background."""
        metrics.STORE_WRITE_FAILURES.get().inc(tags={"operation": operation})
        logger.error(
            "request %s: %s could not be written to the state store (%r); retrying for up to %d s",
            request_id,
            operation,
            exc,
            STORE_RETRY_WINDOW_SEC,
        )
        self.background.spawn(self._retry(operation, request_id, write, *args))

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
