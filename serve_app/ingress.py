"""ChatStream's own ingress: a FastAPI app behind the HTTP edge, on a Serve deployment.

(No `from __future__ import annotations` here: Serve's ingress wrapper needs real annotations.)

The deployment accepts every request at once (very large `max_ongoing_requests`): waiting for a
generation slot happens inside it, where a client that leaves is seen and counted. Its
constructor builds the replica's parts (serve_app/assembly.py); Serve then asks it for its app
(`__serve_build_asgi_app__`), which `build_api` makes around those parts: the edge middleware
and exception handlers (serve_app/edge.py) and the thin routers (serve_app/routes/), which find
the services on the app's state. See docs/http-api.md for the API.
"""

import warnings

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.assembly import Parts, build_parts
from serve_app.chat_stream import ChatStream
from serve_app.config import ChatStreamConfig
from serve_app.edge import EdgeMiddleware, exception_handlers
from serve_app.responses.service import ResponsesService
from serve_app.routes import admin, chat, openai, openapi, responses

# Far above any realistic concurrency: the ingress itself must never queue or refuse.
INGRESS_MAX_ONGOING_REQUESTS = 100_000


def build_api(parts: Parts) -> FastAPI:
    """ChatStream's HTTP API around one replica's parts."""
    api = FastAPI(
        title="ChatStream",
        description="Streaming chat over pre-trained language models",
        exception_handlers=exception_handlers(parts.edge),
    )
    api.state.parts = parts
    api.state.chat_stream = ChatStream(parts)
    api.state.responses = ResponsesService(parts)
    api.mount("/static", StaticFiles(directory=admin.STATIC_DIR, check_dir=False), name="static")
    for routes in (chat, openai, responses, admin):
        api.include_router(routes.router)
    guards = {**chat.GUARDS, **openai.GUARDS, **responses.GUARDS, **admin.GUARDS}
    api.add_middleware(EdgeMiddleware, edge=parts.edge, guards=guards)
    with warnings.catch_warnings():  # the routes with two methods; finish_document says so
        warnings.simplefilter("ignore", UserWarning)
        openapi.finish_document(api, parts.openai.model_name)
    return api


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class ChatStreamIngress:
    async def __init__(self, model: DeploymentHandle, config: ChatStreamConfig) -> None:
        self.parts = await build_parts(model, config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.parts)

    async def __del__(self) -> None:
        """Serve calls this on shutdown: pending bookkeeping and callbacks get a deadline."""
        await self.parts.drain()
