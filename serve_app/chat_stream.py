"""The ChatStream facade: `await chat_stream.handle_chat_stream_request(request, request_body,
callback)` from any FastAPI route of a Serve ingress, exactly as in ChatStream's original post.

One admitted request walks through: validate -> plan the turn -> wait for a generation slot on
the model deployment (429 when its queue is full) -> wait for the first chunk -> stream the
rest. Whatever ends it, `_Exchange.finish` runs once and decides the outcome; the history is
saved, the outcome recorded, and the callback called, in that order, in a task of its own (so a
cancelled request still completes its bookkeeping).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.config import ChatStreamConfig
from serve_app.conversation import TurnPlan, history_after_answer, plan_turn
from serve_app.engines import PromptFormatter, make_prompt_formatter
from serve_app.outcomes import Outcome, classify_outcome, is_client_disconnect
from serve_app.sessions import (
    ChatPrompt,
    CookieSigner,
    InMemorySessionStore,
    RaySessionStore,
    SessionView,
    new_session_id,
    new_session_record,
)
from serve_app.shared_state import get_shared_state
from serve_app.validation import (
    MESSAGE_ID_HEADER,
    REQUEST_ID_HEADER,
    RequestRejected,
    parse_chat_turn,
    request_id_from,
)

logger = logging.getLogger("ray.serve")

Callback = Callable[[Request, str], Any]


class _LoadBoard:
    """This ingress replica's admitted requests: waiting for a slot, or holding one.

    Each change is reported (absolute numbers, fire-and-forget, in order) to the shared state,
    which sums all replicas for `GET /load`."""

    def __init__(self, state: Any, replica_id: str) -> None:
        self._state = state
        self._replica_id = replica_id
        self.queued = 0
        self.ongoing = 0

    def change(self, queued: int = 0, ongoing: int = 0) -> None:
        self.queued += queued
        self.ongoing += ongoing
        self._state.report_load.remote(self._replica_id, self.ongoing, self.queued)


@dataclass(eq=False)
class _Exchange:
    """One admitted request, from admission to its single outcome."""

    chat_stream: ChatStream
    request: Request
    request_id: str
    message_id: str
    session: SessionView
    plan: TurnPlan
    model_stream: DeploymentResponseGenerator
    callback: Callback | None
    admitted_at: float = field(default_factory=time.monotonic)
    holds_slot: bool = False
    sent: list[str] = field(default_factory=list)
    completed: bool = False
    finished: bool = False

    def finish(self, exc: BaseException | None) -> None:
        """Decide the outcome (once) and start the bookkeeping. Never awaits: it is called from
        `finally` blocks of cancelled tasks."""
        if self.finished:
            return
        self.finished = True
        if not self.completed:
            self.model_stream.cancel()  # frees the engine's slot at once
        if self.holds_slot:
            self.chat_stream.load_board.change(ongoing=-1)
        else:
            self.chat_stream.load_board.change(queued=-1)
        outcome = classify_outcome(len(self.sent), self.completed, exc)
        if outcome is Outcome.UNKNOWN_ERROR_OCCURRED:
            logger.error("request %s failed: %r", self.request_id, exc)
        self.chat_stream.spawn(self.chat_stream.complete(self, outcome))


class _OutcomeStreamingResponse(StreamingResponse):
    """A StreamingResponse that reports how sending ended, even if its body never started."""

    def __init__(self, exchange: _Exchange, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._exchange = exchange
        # If the request is cancelled after the route returned this response but before the
        # server called it, only garbage collection sees it go: finish the exchange then.
        weakref.finalize(self, exchange.finish, asyncio.CancelledError("response never sent"))

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
            self._exchange.finish(error)


class ChatStream:
    """Streaming chat with sessions, admission control and exactly-once outcome callbacks."""

    def __init__(
        self,
        *,
        config: ChatStreamConfig,
        model: DeploymentHandle,
        formatter: PromptFormatter,
        state: Any,
        signer: CookieSigner,
        replica_id: str,
    ) -> None:
        self.config = config
        self.formatter = formatter
        self.state = state
        self.signer = signer
        self.sessions = (
            RaySessionStore(state)
            if config.session_store == "ray"
            else InMemorySessionStore(config.session_ttl_sec)
        )
        self.load_board = _LoadBoard(state, replica_id)
        self._model = model.options(stream=True)
        self._defaults = config.generation_defaults().model_dump()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        self._outcomes = Counter(
            "chatstream_outcomes_total",
            description="Admitted requests by outcome",
            tag_keys=("outcome",),
        )
        self._rejections = Counter(
            "chatstream_rejections_total",
            description="Requests refused before admission, by reason",
            tag_keys=("reason",),
        )
        self._ttft = Histogram(
            "chatstream_time_to_first_token_seconds",
            description="From admission to the first chunk of the answer",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        )

    @classmethod
    async def create(cls, model: DeploymentHandle, config: ChatStreamConfig) -> ChatStream:
        """Build it inside a Serve ingress replica (e.g. in an `async def __init__`)."""
        context = serve.get_replica_context()
        state = get_shared_state(context.app_name, config.session_ttl_sec, config.ledger_size)
        secret = config.session_secret or await state.session_secret.remote()
        formatter = await asyncio.to_thread(make_prompt_formatter, config)
        return cls(
            config=config,
            model=model,
            formatter=formatter,
            state=state,
            signer=CookieSigner(secret, config.session_ttl_sec),
            replica_id=context.replica_id.unique_id,
        )

    # ------------------------------------------------------------------ sessions
    async def open_session(self, request: Request) -> SessionView:
        """Load (or start) the request's session and expose it as `request.state.session`."""
        session_id = self.signer.unsign(request.cookies.get(self.config.session_cookie_name))
        record = await self.sessions.load(session_id) if session_id else None
        is_new = session_id is None
        session_id = session_id or new_session_id()
        record = record or new_session_record()
        view = SessionView(
            session_id,
            record,
            ChatPrompt(record["messages"], self.formatter, self.config.system_prompt),
            is_new=is_new,
        )
        request.state.session = view
        return view

    async def save_session(self, view: SessionView, **changes: Any) -> None:
        """Apply `changes` to the newest stored record (other fields may have changed
        meanwhile, e.g. params set by another request) and keep the view in step."""
        record = await self.sessions.load(view.session_id) or new_session_record()
        record.update(changes)
        await self.sessions.save(view.session_id, record)
        view.update(record)

    def generation_params(self, view: SessionView) -> dict[str, Any]:
        """The session's generation parameters: the app's defaults, overridden by the session's."""
        return {**self._defaults, **view.record["params"]}

    def with_cookie(self, response: Response, view: SessionView) -> Response:
        if view.is_new:
            response.set_cookie(
                self.config.session_cookie_name,
                self.signer.sign(view.session_id),
                max_age=self.config.session_ttl_sec,
                httponly=True,
                samesite="lax",
                secure=self.config.cookie_secure,
            )
        return response

    # ------------------------------------------------------------------ the chat turn
    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: bytes | None = None,
        callback: Callback | None = None,
    ) -> Response:
        """Answer one chat turn as a text stream. Pass `request_body` if the route already read
        the body; `callback(request, message)` (sync or async) is called exactly once per
        admitted request with one of the four outcomes."""
        request_id = uuid.uuid4().hex
        try:
            request_id = request_id_from(request.headers)
            view = await self.open_session(request)
            body = request_body if request_body is not None else await request.body()
            turn = parse_chat_turn(body)
            plan = plan_turn(
                view.record["messages"],
                turn,
                defaults=self._defaults,
                session_params=view.record.get("params", {}),
                formatter=self.formatter,
                system_prompt=self.config.system_prompt,
                max_turns=self.config.session_max_turns,
            )
        except RequestRejected as rejected:
            return await self.reject(request_id, rejected)

        exchange = _Exchange(
            chat_stream=self,
            request=request,
            request_id=request_id,
            message_id=uuid.uuid4().hex,
            session=view,
            plan=plan,
            model_stream=self._model.generate.remote(plan.prompt, plan.params),
            callback=callback,
        )
        self.load_board.change(queued=1)
        try:
            await exchange.model_stream.__anext__()  # SLOT_ACQUIRED: a generation slot is ours
            exchange.holds_slot = True
            self.load_board.change(queued=-1, ongoing=1)
            first_chunk = await self._next_chunk(exchange.model_stream)
        except BackPressureError:
            exchange.finished = True  # refused, not admitted: no outcome, no callback
            self.load_board.change(queued=-1)
            return await self.reject(
                request_id,
                RequestRejected(
                    429,
                    "too_many_requests",
                    "all generation slots and queue places are taken; retry later",
                    {"Retry-After": str(self.config.retry_after_sec)},
                ),
            )
        except BaseException as exc:
            exchange.finish(exc)
            if is_client_disconnect(exc):
                raise
            return JSONResponse(
                {
                    "error": "unknown_error_occurred",
                    "message": "generation failed; see server logs",
                },
                status_code=500,
                headers={REQUEST_ID_HEADER: request_id},
            )
        self._ttft.observe(time.monotonic() - exchange.admitted_at)
        response = _OutcomeStreamingResponse(
            exchange,
            self._relay(exchange, first_chunk),
            media_type="text/plain; charset=utf-8",
            headers={REQUEST_ID_HEADER: request_id, MESSAGE_ID_HEADER: exchange.message_id},
        )
        return self.with_cookie(response, view)

    @staticmethod
    async def _next_chunk(model_stream: DeploymentResponseGenerator) -> str | None:
        """The next non-empty chunk, or None at the end of the answer."""
        async for chunk in model_stream:
            if chunk:
                return chunk
        return None

    async def _relay(self, exchange: _Exchange, chunk: str | None) -> AsyncIterator[str]:
        error: BaseException | None = None
        try:
            while chunk is not None:
                yield chunk
                exchange.sent.append(chunk)  # resumed: the chunk went out
                chunk = await self._next_chunk(exchange.model_stream)
            exchange.completed = True
        except BaseException as exc:
            error = exc
            raise
        finally:
            exchange.finish(error)

    async def reject(self, request_id: str, rejected: RequestRejected) -> Response:
        self._rejections.inc(tags={"reason": rejected.error})
        await self.state.record_rejection.remote(request_id, rejected.error)
        response = rejected.response()
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    # ------------------------------------------------------------------ after the stream
    def spawn(self, coro: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called by a finalizer outside the event loop's thread
            self._loop.call_soon_threadsafe(self.spawn, coro)
            return
        # A fresh context: the request's context (and its cancellation) is not inherited.
        task = loop.create_task(coro, context=contextvars.Context())
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def complete(self, exchange: _Exchange, outcome: Outcome) -> None:
        """Save history, record the outcome, call the callback. Each step runs even if an
        earlier one failed, so the callback fires exactly once."""
        if exchange.sent and outcome in (
            Outcome.SUCCESS,
            Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING,
        ):
            messages = history_after_answer(
                exchange.plan.messages, "".join(exchange.sent), exchange.message_id
            )
            await self._guarded(
                "saving the session", self.save_session(exchange.session, messages=messages)
            )
        self._outcomes.inc(tags={"outcome": outcome.value})
        await self._guarded(
            "recording the outcome",
            self.state.record_outcome.remote(exchange.request_id, outcome.value),
        )
        if exchange.callback is not None:
            await self._guarded(
                "the completion callback", _call(exchange.callback, exchange.request, outcome.value)
            )

    async def _guarded(self, what: str, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("ChatStream: %s failed", what)

    # ------------------------------------------------------------------ inspection
    async def load(self) -> dict[str, int]:
        totals = await self.state.load.remote()
        queue = self.config.max_queued_requests
        replicas = self.config.max_replicas if self.config.autoscaling else self.config.num_replicas
        return {
            **totals,
            "capacity": replicas * self.config.max_ongoing_requests,
            "max_queued": (
                -1 if queue < 0 else queue * self.config.ingress_replicas  # per ingress replica
            ),
        }


async def _call(callback: Callback, request: Request, message: str) -> None:
    result = callback(request, message)
    if inspect.isawaitable(result):
        await result
