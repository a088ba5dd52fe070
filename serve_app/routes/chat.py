"""ChatStream's own routes: `/chat_stream` and the session's endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_app import session_state
from serve_app.access import Guard
from serve_app.refusals import Refusal
from serve_app.routes import openapi
from serve_app.validation import parse_feedback, parse_generation_overrides, parse_json_object

router = APIRouter()
GUARDS = {"/chat_stream": Guard.ADMITS}
_SESSION_ERRORS = openapi.errors(*openapi.SESSION)
_TEXT_STREAM = {200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                      "description": "The answer, streamed as it is generated"}}  # fmt: skip


@router.post(
    "/chat_stream",
    response_class=Response,
    responses={**_TEXT_STREAM, **openapi.errors(*openapi.CHAT)},
    openapi_extra=openapi.json_body(
        openapi.chat_turn_schema(), "A chat turn, or `regenerate`; sampling overrides"
    ),
)
async def chat_stream(request: Request) -> Response:
    return await request.app.state.chat_stream.handle_chat_stream_request(request)


@router.get("/history", responses=_SESSION_ERRORS)
async def history(request: Request) -> Response:
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    return sessions.with_cookie(JSONResponse({"messages": view.record["messages"]}), view)


@router.get("/prompt", responses=_SESSION_ERRORS)
async def prompt(request: Request) -> Response:
    """The prompt of the session's next turn: as text, and (engines with a tokenizer) token by
    token as the model gets it, where a control token is one entry marked special and the same
    characters typed by a user are ordinary pieces."""
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    chat_prompt = view.chat_prompt
    body: dict = {"prompt": chat_prompt.create_prompt()}
    tokens = chat_prompt.formatter.describe(chat_prompt.model_input())
    if tokens is not None:
        body["tokens"] = tokens
    return sessions.with_cookie(JSONResponse(body), view)


@router.post("/clear_context", responses=_SESSION_ERRORS)
async def clear_context(request: Request) -> Response:
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    if view.stored:  # a client with no session has nothing to clear
        await sessions.change(view, session_state.clear())
    return sessions.with_cookie(JSONResponse({"cleared": True}), view)


@router.api_route(
    "/generation_params",
    methods=["GET", "PUT"],
    responses={**_SESSION_ERRORS, **openapi.errors(413)},
    openapi_extra=openapi.json_body(
        openapi.generation_params_schema(closed=True), "PUT: this session's sampling parameters"
    ),
)
async def generation_params(request: Request) -> Response:
    """GET: the session's generation parameters (the app's defaults, overridden by the
    session's); PUT: change them."""
    parts = request.app.state.parts
    sessions = parts.sessions
    if request.method == "PUT":
        update = parse_generation_overrides(await parts.edge.read_body(request))
        view = await sessions.open(request)
        await sessions.change(view, session_state.set_params(update.as_dict()))
    else:
        view = await sessions.open(request)
    return sessions.with_cookie(JSONResponse(sessions.generation_params(view)), view)


@router.post(
    "/feedback",
    responses={**_SESSION_ERRORS, **openapi.errors(404, 413)},
    openapi_extra=openapi.json_body(openapi.FEEDBACK_SCHEMA, "A rating of one answer"),
)
async def feedback(request: Request) -> Response:
    parts = request.app.state.parts
    message_id, entry = parse_feedback(parse_json_object(await parts.edge.read_body(request)))
    view = await parts.sessions.open(request)
    try:
        await parts.sessions.change(view, session_state.add_feedback(message_id, entry))
    except session_state.UnknownMessage:
        raise Refusal(
            404, "unknown_message_id", "message_id names no answer of this session"
        ) from None
    return parts.sessions.with_cookie(JSONResponse({"recorded": True}), view)
