"""The Responses routes (`/v1/responses`): create, retrieve, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.access import Guard
from serve_app.openai_api.encoding import SSE_MEDIA_TYPE
from serve_app.routes import openapi
from serve_app.routes.responses_openapi import response_create_schema

router = APIRouter()
GUARDS = {"/v1/responses": Guard.ADMITS, "/v1/responses/{response_id}": Guard.KEY}
_STORED = openapi.errors(*openapi.EDGE, 401, 404, 503, openai=True)


@router.post(
    "/v1/responses",
    response_class=Response,
    responses={
        200: {
            "description": "A response object, or its typed events when streaming",
            "content": {"application/json": {}, SSE_MEDIA_TYPE: {}},
        },
        **openapi.errors(*openapi.OPENAI, 409, openai=True),
    },
    openapi_extra=openapi.json_body(response_create_schema(), "OpenAI's Responses request"),
)
async def create_response(request: Request) -> Response:
    return await request.app.state.responses.create(request)


@router.get("/v1/responses/{response_id}", response_class=Response, responses=_STORED)
async def retrieve_response(request: Request, response_id: str) -> Response:
    """A stored response (404 for another API key's, or a deleted or expired one)."""
    return await request.app.state.responses.retrieve(request, response_id)


@router.delete("/v1/responses/{response_id}", response_class=Response, responses=_STORED)
async def delete_response(request: Request, response_id: str) -> Response:
    """Delete a stored response's conversation (its whole chain)."""
    return await request.app.state.responses.delete(request, response_id)
