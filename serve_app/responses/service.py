"""`/v1/responses` on ChatStream's request path: a response chain IS a conversation.

A stored response lives in the session store as the answer of a turn of one session record,
the chain's (key `responses:<chain>`; a response id is `resp_<chain><answer id>`). So a chain
has a session's rules: the same limits (turns, TTL), atomic changes, one active turn (409), a
503 when the store is down, the cut-answer rule (the bookkeeping saves what the client got) and,
on Redis, it survives restarts and is shared by every ingress replica. The record's `owner` is
the API key id that made it: for any other key the chain's responses do not exist (404).

One POST: the edge's checks (API key, its stream limit) -> parse (400/404) -> with
`previous_response_id`, load its chain (404 unless it is this key's, 409 unless it is the
chain's latest answer) -> with `store`, take the chain's turn (409) -> plan the prompt (the
oldest turns give way to the context) -> admission (429) -> the typed SSE events or one
response object. From admission on, the outcome, ledger, metrics, usage, callback and the saved
turn are the admission's and the bookkeeping's, as for `/chat_stream`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.access import Caller, Guard, caller_of
from serve_app.admission import GenerationFailed
from serve_app.assembly import Parts
from serve_app.config import GenerationParams
from serve_app.conversation import ChatPrompt, TurnPlan, capped_params, fit_to_context
from serve_app.exchange import Callback, Turn
from serve_app.model_contract import GenerationRequest
from serve_app.openai_api.encoding import SSE_HEADERS, SSE_MEDIA_TYPE
from serve_app.openai_api.service import failure, id_headers, served_model_name
from serve_app.openai_api.tool_answers import engine_constraint
from serve_app.openai_api.tool_calls import tools_system_prompt
from serve_app.outcomes import is_client_disconnect
from serve_app.refusals import Refusal, store_unavailable
from serve_app.responses.encoding import (
    ResponseEvents,
    ResponseFacts,
    response_object,
    status_of,
    stored_response,
)
from serve_app.responses.protocol import (
    ResponseRequest,
    parse_response_request,
    response_id,
    response_not_found,
    split_response_id,
)
from serve_app.responses.tool_items import as_the_model_reads
from serve_app.session_state import (
    NotOwner,
    Record,
    TurnInProgress,
    begin_turn,
    clear,
    trim_history,
)
from serve_app.sessions import SessionView
from serve_app.stores import StoreUnavailable

CHAIN_KEY_PREFIX = "responses:"


def chain_key(chain: str) -> str:
    """The chain's session id in the store (never a cookie's: those are signed)."""
    return f"{CHAIN_KEY_PREFIX}{chain}"


def find_answer(record: Record | None, message_id: str, key_id: str) -> int | None:
    """The position of the answer `message_id` in a chain of `key_id`'s, or None."""
    if record is None or record.get("owner") != key_id:
        return None
    for position, message in enumerate(record["messages"]):
        if message["role"] == "assistant" and message.get("message_id") == message_id:
            return position if "meta" in message else None
    return None


class ResponsesService:
    """Runs `/v1/responses` requests for one ingress replica."""

    def __init__(self, parts: Parts) -> None:
        self._parts = parts
        self._config = parts.config
        self.model_name = served_model_name(parts.config)
        self._defaults = parts.config.generation_defaults().model_dump()

    # ------------------------------------------------------------------ POST
    async def create(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response:
        """Answer one `POST /v1/responses` (the body, if a route already read it)."""
        parts = self._parts
        turn_id = uuid.uuid4().hex  # known before it is taken: any failure can give it back
        view: SessionView | None = None
        try:
            caller = caller_of(request) or await parts.edge.enter(request, Guard.ADMITS)
            body = await parts.edge.read_body(request, request_body)
            ask = parse_response_request(body, served_model=self.model_name)
            chain, history = await self._previous(ask, caller)
            if ask.store:
                chain = chain or uuid.uuid4().hex
                view = await self._begin_turn(chain, turn_id, caller.key_id)
                if ask.previous_response_id:  # again, under the chain's lock
                    history = self._continued(view.record, ask.previous_response_id, caller)
            facts = ResponseFacts(
                id="",  # the answer's id is known at admission
                created_at=time.time(),
                model=ask.model,
                instructions=ask.instructions,
                params=ask.params,
                previous_response_id=ask.previous_response_id,
                store=ask.store,
                metadata=ask.metadata,
                tools=ask.tools,
                tool_choice=ask.tool_choice,
            )
            plan = self._plan(history, ask)
            turn = None
            if view is not None:
                turn = Turn(
                    turn_id,
                    view.record["epoch"],
                    ask.messages,
                    kept_messages=len(plan.messages),
                    answer_meta=facts.as_meta(),
                )
            generation = GenerationRequest(
                plan.model_input,
                GenerationParams(**plan.params),
                seed=ask.seed,
                session=f"responses:{chain}" if chain else None,  # the chain is the session
                constraint=engine_constraint(
                    ask.constraint,
                    self._config.engine,
                    "tool_choice" if ask.tool_choice.forced else "text.format",
                ),
            )
            exchange, first = await parts.admission.admit(
                request, caller, generation, callback, view, turn
            )
        except GenerationFailed as failed:  # admitted: the bookkeeping released the turn
            return failure(failed.request_id)
        except Refusal as refusal:  # 4xx, 429, 503: not admitted
            self._give_back_turn(view, turn_id)
            return await parts.edge.refuse(request, refusal, openai=True)
        except BaseException:  # e.g. the client left; an admitted exchange did the same
            self._give_back_turn(view, turn_id)
            if (caller := caller_of(request)) is not None:
                caller.release()
            raise
        # Not stored: an id of no chain (retrieving it is a 404).
        facts = dataclasses.replace(
            facts, id=response_id(chain or uuid.uuid4().hex, exchange.message_id)
        )
        headers = id_headers(exchange.request_id)
        admission = parts.admission
        if ask.stream:
            events = admission.relay(exchange, first, ResponseEvents(facts))
            return admission.response(
                exchange, events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **headers}
            )
        try:
            text = await admission.collect(exchange, first)
        except Exception as exc:  # the outcome is recorded
            if is_client_disconnect(exc):
                raise
            return failure(exchange.request_id)
        status, details = status_of("success", exchange.finish_reason)
        answer = response_object(
            facts,
            status=status,
            text=text,
            incomplete_details=details,
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
        )
        # Sent whole, and ended once the answer is saved: a follow-up right after finds it.
        body = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
        return admission.response(
            exchange,
            admission.send_once(exchange, body, text),
            media_type="application/json",
            headers=headers,
        )

    async def _previous(
        self, ask: ResponseRequest, caller: Caller
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """The chain and history that `previous_response_id` continues (none: a new chain)."""
        if ask.previous_response_id is None:
            return None, []
        ids = split_response_id(ask.previous_response_id)
        if ids is None:
            raise response_not_found(ask.previous_response_id, "previous_response_id")
        record = await self._load(ids[0])
        return ids[0], self._continued(record, ask.previous_response_id, caller)

    @staticmethod
    def _continued(record: Record | None, previous: str, caller: Caller) -> list[dict[str, Any]]:
        """The history up to `previous`, which must be its chain's latest answer."""
        chain, message_id = split_response_id(previous) or ("", "")
        position = find_answer(record, message_id, caller.key_id)
        if position is None:
            raise response_not_found(previous, "previous_response_id")
        if position != len(record["messages"]) - 1:
            raise Refusal(
                409,
                "previous_response_not_latest",
                f"'{previous}' is not the latest response of its conversation; continue from "
                "the latest one (a conversation here is one chain, not a tree)",
                param="previous_response_id",
            )
        return record["messages"]

    async def _begin_turn(self, chain: str, turn_id: str, key_id: str) -> SessionView:
        """Take the chain's one active turn (409 if another is streaming; 404 if the chain is
        another key's), making a new chain this key's."""
        change = begin_turn(turn_id, time.time(), self._config.turn_lock_ttl_sec, owner=key_id)
        try:
            record = await self._parts.store.change_session(chain_key(chain), change)
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None
        except NotOwner:
            raise response_not_found(f"resp_{chain}", "previous_response_id") from None
        except TurnInProgress:
            raise Refusal(
                409,
                "turn_in_progress",
                "this conversation's previous response is still being generated; wait for it "
                "to finish before continuing it",
                param="previous_response_id",
            ) from None
        prompt = ChatPrompt(record["messages"], self._parts.formatter)
        return SessionView(chain_key(chain), record, prompt, stored=True)

    def _plan(self, history: list[dict[str, Any]], ask: ResponseRequest) -> TurnPlan:
        """The chain's history and the new input, the oldest turns giving way to the context;
        `instructions` (this response's only, as OpenAI has them) replace the app's system
        prompt."""
        formatter = self._parts.formatter
        system = ask.instructions if ask.instructions is not None else self._config.system_prompt
        if ask.tools and ask.tool_choice.mode != "none":
            offer = tools_system_prompt(ask.tools)
            system = f"{system}\n\n{offer}" if system else offer
        history = [as_the_model_reads(m) for m in history]
        messages = trim_history([*history, *ask.messages], self._config.session_max_turns)
        messages, prompt, model_input, tokens = fit_to_context(messages, formatter, system)
        params = capped_params({**self._defaults, **ask.params}, tokens, formatter.context_length)
        return TurnPlan(messages, prompt, model_input, tokens, params)

    def _give_back_turn(self, view: SessionView | None, turn_id: str) -> None:
        if view is not None:
            self._parts.bookkeeping.release_turn(view.session_id, turn_id)

    # ------------------------------------------------------------------ GET, DELETE
    async def _load(self, chain: str) -> Record | None:
        try:
            return await self._parts.store.load_session(chain_key(chain))
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None

    async def _owned(self, request: Request, value: str) -> tuple[str, Record]:
        """The chain and record of the response `value`, if it is the caller's (else 404)."""
        caller = caller_of(request) or await self._parts.edge.enter(request, Guard.KEY)
        ids = split_response_id(value)
        record = await self._load(ids[0]) if ids else None
        if ids is None or find_answer(record, ids[1], caller.key_id) is None:
            raise response_not_found(value)
        return ids[0], record

    async def retrieve(self, request: Request, value: str) -> Response:
        """`GET /v1/responses/{id}`: a stored response, as it was answered."""
        try:
            _, record = await self._owned(request, value)
        except Refusal as refusal:
            return await self._parts.edge.refuse(request, refusal, openai=True)
        message_id = value[-32:]
        answer = next(m for m in record["messages"] if m.get("message_id") == message_id)
        return JSONResponse(stored_response(value, answer))

    async def delete(self, request: Request, value: str) -> Response:
        """`DELETE /v1/responses/{id}`: forget the response's whole conversation (its chain);
        an answer still streaming on it is not saved."""
        try:
            chain, _ = await self._owned(request, value)
            try:
                await self._parts.store.change_session(chain_key(chain), clear())
            except StoreUnavailable as exc:
                raise store_unavailable(exc) from None
        except Refusal as refusal:
            return await self._parts.edge.refuse(request, refusal, openai=True)
        return JSONResponse({"id": value, "object": "response.deleted", "deleted": True})
