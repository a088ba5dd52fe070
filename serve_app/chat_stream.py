"""The ChatStream facade: `await chat_stream.handle_chat_stream_request(request, request_body,
callback)` from any FastAPI route of a Serve ingress, exactly as in ChatStream's original post.

One request walks through: validate -> take the session's turn (409 if one is streaming) ->
plan the prompt -> wait for a generation slot on the model deployment (429 when its queue is
full) -> wait for the first chunk -> stream the rest. From admission on, an `Exchange`
(serve_app/exchange.py) decides the single outcome and does the bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.metrics import Counter, Histogram
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.config import (
    MODEL_DEPLOYMENT_NAME,
    REDIS_URL_ENV,
    SESSION_SECRET_ENV,
    ChatStreamConfig,
)
from serve_app.conversation import ChatPrompt, plan_turn
from serve_app.engines import PromptFormatter, make_prompt_formatter
from serve_app.engines.base import ModelInput
from serve_app.exchange import Bookkeeping, Callback, Exchange, Turn
from serve_app.outcomes import is_client_disconnect
from serve_app.session_state import (
    SessionChange,
    SessionLimits,
    TurnInProgress,
    begin_turn,
    new_record,
)
from serve_app.sessions import CookieSigner, SessionView, new_session_id
from serve_app.stores import StateStore, StoreSettings, StoreUnavailable, make_store
from serve_app.validation import (
    MESSAGE_ID_HEADER,
    REQUEST_ID_HEADER,
    RequestRejected,
    parse_chat_turn,
    read_body,
    request_id_from,
)

logger = logging.getLogger("ray.serve")

# Retry-After of a 503 store_unavailable: a restarting store is usually back within seconds.
STORE_RETRY_AFTER_SEC = 2
# How long the end of a whole answer waits for the session to be saved.
TURN_SAVE_WAIT_SEC = 5.0


class GenerationFailed(Exception):
    """The engine failed before the first chunk (the outcome is already recorded)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id)
        self.request_id = request_id  # the request's key in the ledger


class OutcomeStreamingResponse(StreamingResponse):
    """A StreamingResponse that reports how sending ended, even if its body never started."""

    def __init__(self, exchange: Exchange, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._exchange = exchange
        # If the request is cancelled after the route returned this response but before the
        # server called it, only garbage collection sees it go: finish the exchange then. The
        # collector may run in any thread, or in the middle of other code on the loop's
        # thread, so the finish is queued on the event loop, never run in place.
        weakref.finalize(
            self,
            exchange.bookkeeping.call_soon,
            exchange.finish,
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
            self._exchange.finish(error)


def store_unavailable_rejection(exc: StoreUnavailable) -> RequestRejected:
    """The 503 for any request that needs the state store while it cannot be reached."""
    logger.warning("state store unavailable: %s", exc)
    return RequestRejected(
        503,
        "store_unavailable",
        "the session store cannot be reached right now; retry shortly",
        {"Retry-After": str(STORE_RETRY_AFTER_SEC)},
    )


def store_settings(config: ChatStreamConfig, namespace: str) -> StoreSettings:
    return StoreSettings(
        namespace=namespace,
        session_ttl_sec=config.session_ttl_sec,
        max_sessions=config.max_sessions,
        max_new_sessions=config.max_new_sessions,
        limits=SessionLimits(
            max_turns=config.session_max_turns, max_feedback=config.session_max_feedback
        ),
        ledger_size=config.ledger_size,
        signing_key=os.environ.get(SESSION_SECRET_ENV, ""),
    )


class ChatStream:
    """Streaming chat with sessions, admission control and exactly-once outcome callbacks."""

    def __init__(
        self,
        *,
        config: ChatStreamConfig,
        model: DeploymentHandle,
        formatter: PromptFormatter,
        store: StateStore,
        signer: CookieSigner,
        replica_id: str,
        app_name: str = "",
        ingress_name: str = "",
    ) -> None:
        self.config = config
        self.app_name = app_name
        self.replica_id = replica_id
        self.ingress_name = ingress_name
        self.formatter = formatter
        self.store = store
        self.signer = signer
        self.bookkeeping = Bookkeeping(
            store,
            SessionLimits(config.session_max_turns, config.session_max_feedback),
            replica_id,
            callback_timeout_sec=config.callback_timeout_sec,
            callback_threads=config.callback_threads,
        )
        self._model = model.options(stream=True)
        self._defaults = config.generation_defaults().model_dump()
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
        store = make_store(
            config.session_store,
            store_settings(config, context.app_name),
            redis_url=os.environ.get(REDIS_URL_ENV, ""),
        )
        formatter = await asyncio.to_thread(make_prompt_formatter, config)
        return cls(
            config=config,
            model=model,
            formatter=formatter,
            store=store,
            signer=CookieSigner(await store.signing_key(), config.session_ttl_sec),
            replica_id=context.replica_id.unique_id,
            app_name=context.app_name,
            ingress_name=context.deployment,
        )

    # ------------------------------------------------------------------ sessions
    async def open_session(self, request: Request) -> SessionView:
        """The request's session (a new, not yet stored one if the cookie names none), also
        exposed as `request.state.session`. Raises RequestRejected (503) if the store is down."""
        session_id = self.signer.unsign(request.cookies.get(self.config.session_cookie_name))
        try:
            record = await self.store.load_session(session_id) if session_id else None
        except StoreUnavailable as exc:
            raise store_unavailable_rejection(exc) from None
        stored = record is not None
        view = SessionView(
            session_id if stored else new_session_id(),
            record if stored else new_record(),
            ChatPrompt(
                record["messages"] if stored else [], self.formatter, self.config.system_prompt
            ),
            stored=stored,
        )
        request.state.session = view
        return view

    async def change_session(self, view: SessionView, change: SessionChange) -> None:
        """Apply `change` to the stored session (atomically, on the store's side) and keep the
        view in step. Raises RequestRejected (503) if the store is down."""
        try:
            view.update(await self.store.change_session(view.session_id, change))
        except StoreUnavailable as exc:
            raise store_unavailable_rejection(exc) from None

    def generation_params(self, view: SessionView) -> dict[str, Any]:
        """The session's generation parameters: the app's defaults, overridden by the session's."""
        return {**self._defaults, **view.record["params"]}

    def with_cookie(self, response: Response, view: SessionView) -> Response:
        """Set (or refresh: expiry counts from last use) the cookie of a stored session."""
        if view.stored:
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
        turn_id = uuid.uuid4().hex  # known before it is taken: any failure can give it back
        view: SessionView | None = None
        try:
            request_id = request_id_from(request.headers)
            body = await read_body(request, request_body, self.config.max_body_bytes)
            turn_request = parse_chat_turn(body)
            view = await self.open_session(request)
            turn = await self._begin_turn(
                view, turn_id, turn_request.user_input, turn_request.regenerate
            )
            plan = plan_turn(
                view.record["messages"],
                turn_request,
                defaults=self._defaults,
                session_params=view.record.get("params", {}),
                formatter=self.formatter,
                system_prompt=self.config.system_prompt,
                max_turns=self.config.session_max_turns,
            )
            turn = dataclasses.replace(turn, kept_messages=len(plan.messages))
            exchange, first_chunk = await self.admit(
                request, request_id, plan.model_input, plan.params, callback, view, turn
            )
        except GenerationFailed as failed:  # admitted: its exchange released the turn
            return JSONResponse(
                {
                    "error": "unknown_error_occurred",
                    "message": "generation failed; see server logs",
                },
                status_code=500,
                headers={REQUEST_ID_HEADER: failed.request_id},
            )
        except RequestRejected as rejected:  # 4xx, 429, 503: not admitted
            self._give_back_turn(view, turn_id)
            return await self.reject(request_id, rejected, view)
        except BaseException:  # e.g. the client left; an admitted exchange did the same
            self._give_back_turn(view, turn_id)
            raise
        response = OutcomeStreamingResponse(
            exchange,
            self.relay(exchange, first_chunk),
            media_type="text/plain; charset=utf-8",
            headers={
                REQUEST_ID_HEADER: exchange.request_id,  # its ledger key
                MESSAGE_ID_HEADER: exchange.message_id,
            },
        )
        return self.with_cookie(response, view)

    async def handle_chat_completions_request(
        self,
        request: Request,
        request_body: bytes | None = None,
        callback: Callback | None = None,
    ) -> Response:
        """Answer one OpenAI `/v1/chat/completions` request (SSE when `stream` is true),
        statelessly, with the same admission, outcomes, ledger and callbacks as a chat turn.
        See serve_app/openai_route.py."""
        from serve_app.openai_route import handle_chat_completions  # it imports this module

        return await handle_chat_completions(self, request, request_body, callback)

    async def admit(
        self,
        request: Request,
        request_id: str,
        prompt: ModelInput,
        params: dict[str, Any],
        callback: Callback | None,
        session: SessionView | None = None,
        turn: Turn | None = None,
    ) -> tuple[Exchange, str | None]:
        """Wait for a generation slot and the answer's first chunk (None: an empty answer).

        From the call on, the request is admitted: its Exchange decides one outcome. Raises
        RequestRejected (429, not admitted) when the queue is full, GenerationFailed when the
        engine failed before the first chunk (outcome recorded), and re-raises a client
        disconnect (outcome recorded). Stream the rest with `relay`, inside an
        OutcomeStreamingResponse."""
        record_id = uuid.uuid4().hex
        try:  # open in the durable ledger: if this replica dies, a survivor closes it
            request_id = await self.store.open_request(record_id, request_id, self.replica_id)
        except StoreUnavailable as exc:
            raise store_unavailable_rejection(exc) from None
        exchange = Exchange(
            request=request,
            request_id=request_id,
            record_id=record_id,
            message_id=uuid.uuid4().hex,
            session=session,
            turn=turn,
            model_stream=self._model.generate.remote(prompt, params),
            callback=callback,
            bookkeeping=self.bookkeeping,
        )
        load_board = self.bookkeeping.load_board
        load_board.change(queued=1)
        try:
            await exchange.model_stream.__anext__()  # SLOT_ACQUIRED: a generation slot is ours
            exchange.holds_slot = True
            load_board.change(queued=-1, ongoing=1)
            first_chunk = await self._next_chunk(exchange.model_stream)
        except BackPressureError:
            exchange.finished = True  # refused, not admitted: no outcome, no callback
            load_board.change(queued=-1)
            with contextlib.suppress(StoreUnavailable):
                await self.store.close_request(record_id)
            raise RequestRejected(
                429,
                "too_many_requests",
                "all generation slots and queue places are taken; retry later",
                {"Retry-After": str(self.config.retry_after_sec)},
            ) from None
        except BaseException as exc:
            exchange.finish(exc)
            if is_client_disconnect(exc):
                raise
            raise GenerationFailed(exchange.request_id) from exc
        self._ttft.observe(time.monotonic() - exchange.admitted_at)
        return exchange, first_chunk

    async def _begin_turn(
        self, view: SessionView, turn_id: str, user_input: str | None, regenerate: bool
    ) -> Turn:
        """Take the session's one active turn (409 if another is streaming)."""
        try:
            await self.change_session(
                view, begin_turn(turn_id, time.time(), self.config.turn_lock_ttl_sec)
            )
        except TurnInProgress:
            raise RequestRejected(
                409,
                "turn_in_progress",
                "this session's previous answer is still streaming; wait for it to finish "
                "(or stop it) before sending the next turn",
            ) from None
        user_message = None if regenerate else {"role": "user", "content": user_input}
        return Turn(turn_id, view.record["epoch"], user_message)

    def _give_back_turn(self, view: SessionView | None, turn_id: str) -> None:
        """Release a turn that may have been taken, for a request that was not admitted
        (nothing is saved; a no-op if the turn was never taken or is already released)."""
        if view is not None:
            self.bookkeeping.release_turn(view.session_id, turn_id)

    @staticmethod
    async def _next_chunk(model_stream: DeploymentResponseGenerator) -> str | None:
        """The next non-empty chunk, or None at the end of the answer."""
        async for chunk in model_stream:
            if chunk:
                return chunk
        return None

    async def relay(self, exchange: Exchange, chunk: str | None) -> AsyncIterator[str]:
        """The answer's chunks from `chunk` (admit's first) on. A chunk counts as sent once the
        consumer asks for the next one; to end early with success (e.g. a stop string), call
        `exchange.stop()` and close this generator."""
        error: BaseException | None = None
        try:
            # Serve's proxy takes chunks without waiting for the client, and on a loaded
            # machine it may pass on a client's leaving late: a disconnect it already passed
            # on is taken here, before the first chunk, so that it counts as "before streaming".
            if chunk is not None and await exchange.request.is_disconnected():
                raise ClientDisconnect()
            while chunk is not None:
                yield chunk
                exchange.sent.append(chunk)  # resumed: the chunk went out
                chunk = await self._next_chunk(exchange.model_stream)
            exchange.completed = True
            exchange.finish(None)
            # End the response only once the answer is saved (bounded: a slow store must not
            # hold the client), so that what the client saw is what /history shows.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exchange.turn_released.wait(), TURN_SAVE_WAIT_SEC)
        except BaseException as exc:
            error = exc
            raise
        finally:
            exchange.finish(error)

    async def reject(
        self, request_id: str, rejected: RequestRejected, view: SessionView | None = None
    ) -> Response:
        self._rejections.inc(tags={"reason": rejected.error})
        try:
            await self.store.record_rejection(request_id, rejected.error)
        except StoreUnavailable:
            logger.warning(
                "request %s: rejection %s not recorded (store down)", request_id, rejected.error
            )
        response = rejected.response()
        response.headers[REQUEST_ID_HEADER] = request_id
        return self.with_cookie(response, view) if view is not None else response

    # ------------------------------------------------------------------ inspection
    async def load(self) -> dict[str, int]:
        """Requests waiting and holding a slot across ingress replicas, and the slots and
        queue places of what Serve runs now (model replicas are scaled outside the args)."""
        totals = await self.store.load()
        status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
        app = status.applications.get(self.app_name)
        deployments = app.deployments if app else {}

        def running(name: str) -> int:
            return (
                int(deployments[name].replica_states.get("RUNNING", 0))
                if name in deployments
                else 0
            )

        queue = self.config.max_queued_requests
        return {
            **totals,
            "capacity": running(MODEL_DEPLOYMENT_NAME) * self.config.max_ongoing_requests,
            # Serve bounds the queue per caller, that is per ingress replica.
            "max_queued": -1 if queue < 0 else queue * running(self.ingress_name),
        }
