"""The OpenAI-compatible routes (`/v1`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serve_app.edge import Guard
from serve_app.openai_api.encoding import model_list

router = APIRouter()
GUARDS = {"/v1/chat/completions": Guard.ADMITS, "/v1/models": Guard.KEY}
_STARTED = int(time.time())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await request.app.state.parts.openai.chat_completions(request)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    return JSONResponse(model_list(request.app.state.parts.openai.model_name, created=_STARTED))
