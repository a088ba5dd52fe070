"""The OpenAI-compatible routes (`/v1`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_app.access import Guard
from serve_app.openai_api.encoding import model_list
from serve_app.routes import openapi

router = APIRouter()
GUARDS = {
    "/v1/chat/completions": Guard.ADMITS,
    "/v1/completions": Guard.ADMITS,
    "/v1/models": Guard.KEY,
}
_STARTED = int(time.time())


@router.post(
    "/v1/chat/completions",
    response_class=Response,
    responses={
        **openapi.answer_or_events(
            "A chat.completion, or chat.completion.chunk events when streaming"
        ),
        **openapi.errors(*openapi.OPENAI, openai=True),
    },
    openapi_extra=openapi.json_body(openapi.chat_completion_schema(), "OpenAI's chat request"),
)
async def chat_completions(request: Request) -> Response:
    return await request.app.state.parts.openai.chat_completions(request, None, None)


@router.post(
    "/v1/completions",
    response_class=Response,
    responses={
        **openapi.answer_or_events("A text_completion, or text_completion events when streaming"),
        **openapi.errors(*openapi.OPENAI, openai=True),
    },
    openapi_extra=openapi.json_body(openapi.completion_schema(), "OpenAI's completions request"),
)
async def completions(request: Request) -> Response:
    return await request.app.state.parts.openai.completions(request)


@router.get("/v1/models", responses=openapi.errors(*openapi.EDGE, 401, openai=True))
async def models(request: Request) -> Response:
    return JSONResponse(model_list(request.app.state.parts.openai.model_name, created=_STARTED))
