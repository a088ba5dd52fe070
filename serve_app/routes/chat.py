"""ChatStream's own routes: `/chat_stream` and the session's endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_app import session_state
from serve_app.edge import Guard
from serve_app.refusals import Refusal
from serve_app.validation import parse_feedback, parse_generation_overrides, parse_json_object

router = APIRouter()
GUARDS = {"/chat_stream": Guard.ADMITS}


@router.post("/chat_stream")
async def chat_stream(request: Request) -> Response:
    return await request.app.state.chat_stream.handle_chat_stream_request(request)


@router.get("/history")
async def history(request: Request) -> Response:
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    return sessions.with_cookie(JSONResponse({"messages": view.record["messages"]}), view)


@router.get("/prompt")
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


@router.post("/clear_context")
async def clear_context(request: Request) -> Response:
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    if view.stored:  # a client with no session has nothing to clear
        await sessions.change(view, session_state.clear())
    return sessions.with_cookie(JSONResponse({"cleared": True}), view)


@router.get("/generation_params")
async def get_generation_params(request: Request) -> Response:
    sessions = request.app.state.parts.sessions
    view = await sessions.open(request)
    return sessions.with_cookie(JSONResponse(sessions.generation_params(view)), view)


@router.put("/generation_params")
async def set_generation_params(request: Request) -> Response:
    parts = request.app.state.parts
    update = parse_generation_overrides(await parts.edge.read_body(request))
    view = await parts.sessions.open(request)
    await parts.sessions.change(view, session_state.set_params(update.as_dict()))
    params = parts.sessions.generation_params(view)
    return parts.sessions.with_cookie(JSONResponse(params), view)


@router.post("/feedback")
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
