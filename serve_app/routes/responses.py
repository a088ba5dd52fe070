"""The Responses routes (`/v1/responses`): create, retrieve, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serve_app.access import Guard
from serve_app.routes import openapi
from serve_app.routes.responses_openapi import response_create_schema

router = APIRouter()
GUARDS = {"/v1/responses": Guard.ADMITS, "/v1/responses/{response_id}": Guard.KEY}


@router.post(
    "/v1/responses",
    response_class=Response,
    responses={
        **openapi.answer_or_events("A response object, or its typed events when streaming"),
        **openapi.errors(*openapi.OPENAI, 409, openai=True),
    },
    openapi_extra=openapi.json_body(response_create_schema(), "OpenAI's Responses request"),
)
async def create_response(request: Request) -> Response:
    return await request.app.state.responses.create(request)


@router.api_route(
    "/v1/responses/{response_id}",
    methods=["GET", "DELETE"],
    response_class=Response,
    responses=openapi.errors(*openapi.EDGE, 401, 404, 503, openai=True),
)
async def stored_response(request: Request, response_id: str) -> Response:
    """GET: a stored response (404 for another API key's, or a deleted or expired one).
    DELETE: forget its conversation (the whole chain). One route, so that a 405 lists both
    methods in `Allow`."""
    service = request.app.state.responses
    if request.method == "DELETE":
        return await service.delete(request, response_id)
    return await service.retrieve(request, response_id)
