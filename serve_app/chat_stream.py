"""The ChatStream facade: `await chat_stream.handle_chat_stream_request(request, request_body,
callback)` from any FastAPI route of a Serve ingress, exactly as in ChatStream's original post.

ChatStream does the session turn. One request: the edge's checks (once; serve_app/edge.py) ->
read and validate the body -> open the session (`request.state.session`) and take its one
active turn (409 if one is streaming) -> plan the prompt (serve_app/conversation.py) ->
admission (serve_app/admission.py: a slot, 429 when the queue is full; the first chunk) ->
the answer streams as plain text. From admission on, the admission decides the one outcome and
the bookkeeping saves the answer and calls the callback.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from serve_app.access import Guard, caller_of
from serve_app.admission import GenerationFailed
from serve_app.assembly import Parts, build_parts
from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.conversation import plan_turn
from serve_app.exchange import Callback, Exchange, Turn
from serve_app.model_contract import AnswerChunk, GenerationRequest
from serve_app.refusals import Refusal, server_error
from serve_app.session_state import TurnInProgress, begin_turn
from serve_app.sessions import SessionView
from serve_app.validation import MESSAGE_ID_HEADER, REQUEST_ID_HEADER, parse_chat_turn


class TextAnswer:
    """The admission's encoder for `/chat_stream`: the answer's text as it comes."""

    @staticmethod
    def chunk(exchange: Exchange, chunk: AnswerChunk) -> str:
        return chunk.text

    @staticmethod
    def end(exchange: Exchange) -> str:
        return ""

    @staticmethod
    def error() -> None:
        return None  # a plain text stream has no error frame: the connection is cut


class ChatStream:
    """Streaming chat with sessions, admission control and exactly-once outcome callbacks."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._config = parts.config
        self._defaults = parts.config.generation_defaults().model_dump()

    @classmethod
    async def create(cls, model: DeploymentHandle, config: ChatStreamConfig) -> ChatStream:
        """Build it inside a Serve ingress replica (e.g. in an `async def __init__`)."""
        return cls(await build_parts(model, config))

    async def handle_chat_stream_request(
        self,
        request: Request,
        request_body: bytes | None = None,
        callback: Callback | None = None,
    ) -> Response:
        """Answer one chat turn as a text stream. Pass `request_body` if the route already read
        the body; `callback(request, message)` (sync or async) is called exactly once per
        admitted request with one of the four outcomes."""
        parts = self.parts
        turn_id = uuid.uuid4().hex  # known before it is taken: any failure can give it back
        view: SessionView | None = None
        try:
            # Checked by the edge's middleware on ChatStream's own routes; on a user's own
            # route, here.
            caller = caller_of(request) or await parts.edge.enter(request, Guard.ADMITS)
            turn_request = parse_chat_turn(await parts.edge.read_body(request, request_body))
            view = await parts.sessions.open(request)
            turn = await self._begin_turn(view, turn_id, turn_request.user_input,
                                          turn_request.regenerate)  # fmt: skip
            plan = plan_turn(
                view.record["messages"],
                turn_request,
                defaults=self._defaults,
                session_params=view.record.get("params", {}),
                formatter=parts.formatter,
                system_prompt=self._config.system_prompt,
                max_turns=self._config.session_max_turns,
            )
            turn = dataclasses.replace(turn, kept_messages=len(plan.messages))
            generation = GenerationRequest(
                plan.model_input,
                GenerationParams(**plan.params),
                session=f"chat:{view.session_id}",  # its model replica keeps its KV prefix
            )
            exchange, first = await parts.admission.admit(
                request, caller, generation, callback, view, turn
            )
        except GenerationFailed as failed:  # admitted: the bookkeeping released the turn
            response = server_error().response()
            response.headers[REQUEST_ID_HEADER] = failed.request_id
            return response
        except Refusal as refusal:  # 4xx, 429, 503: not admitted
            self._give_back_turn(view, turn_id)
            return parts.sessions.with_cookie(await parts.edge.refuse(request, refusal), view)
        except BaseException:  # e.g. the client left; an admitted exchange did the same
            self._give_back_turn(view, turn_id)
            if (caller := caller_of(request)) is not None:
                caller.release()
            raise
        response = parts.admission.response(
            exchange,
            parts.admission.relay(exchange, first, TextAnswer()),
            media_type="text/plain; charset=utf-8",
            headers={
                REQUEST_ID_HEADER: exchange.request_id,  # its ledger key
                MESSAGE_ID_HEADER: exchange.message_id,
            },
        )
        return parts.sessions.with_cookie(response, view)

    async def handle_chat_completions_request(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response:
        """Answer one OpenAI `/v1/chat/completions` request (SSE when `stream` is true),
        statelessly, with the same admission, outcomes, ledger and callbacks as a chat turn
        (serve_app/openai_api/service.py)."""
        return await self.parts.openai.chat_completions(request, request_body, callback)

    async def _begin_turn(
        self, view: SessionView, turn_id: str, user_input: str | None, regenerate: bool
    ) -> Turn:
        """Take the session's one active turn (409 if another is streaming)."""
        try:
            await self.parts.sessions.change(
                view, begin_turn(turn_id, time.time(), self._config.turn_lock_ttl_sec)
            )
        except TurnInProgress:
            raise Refusal(
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
            self.parts.bookkeeping.release_turn(view.session_id, turn_id)
