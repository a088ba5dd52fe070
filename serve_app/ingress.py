"""The HTTP front: FastAPI routes on a Serve ingress deployment, each a thin call into ChatStream.

(No `from __future__ import annotations` here: Serve's ingress wrapper needs real annotations
to tell FastAPI which parameter is the Request.)

The ingress accepts every request at once (very large `max_ongoing_requests`): waiting for a
generation slot happens inside it, where a client that leaves is seen and counted. See
docs/http-api.md for the API.
"""

import asyncio
from pathlib import Path
from typing import Annotated

import psutil
import ray
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import openai_route, session_state
from serve_app.access import access_of, guard_chat_stream
from serve_app.chat_stream import ChatStream, store_unavailable_rejection
from serve_app.config import ChatStreamConfig
from serve_app.openai_protocol import OpenAIHTTPError
from serve_app.stores import StoreUnavailable
from serve_app.validation import (
    RequestRejected,
    parse_feedback,
    parse_generation_overrides,
    parse_json_object,
    read_body,
)

STATIC_DIR = Path(__file__).parent / "static"
# Far above any realistic concurrency: the ingress itself must never queue or refuse.
INGRESS_MAX_ONGOING_REQUESTS = 100_000

api = FastAPI(title="ChatStream", description="Streaming chat over pre-trained language models")
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


@api.exception_handler(RequestRejected)
async def _rejected(request: Request, rejected: RequestRejected) -> Response:
    """Routes raise RequestRejected for a 4xx/503; this turns it into the JSON error."""
    return rejected.response()


@api.exception_handler(StoreUnavailable)
async def _store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
    """Any route that needs the state store while it is down: 503, retry shortly."""
    return store_unavailable_rejection(exc).response()


@api.exception_handler(OpenAIHTTPError)
async def _openai_error(request: Request, error: OpenAIHTTPError) -> Response:
    """/v1 routes raise OpenAIHTTPError; this answers in OpenAI's error shape."""
    return error.response()


def _resource_usage() -> dict:
    # Defined before the deployment class: Serve pickles the class when it is decorated.
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory": {
            "total_bytes": memory.total,
            "used_bytes": memory.used,
            "percent": memory.percent,
        },
        "cluster": {"total": ray.cluster_resources(), "available": ray.available_resources()},
    }


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class ChatStreamIngress:
    async def __init__(self, model: DeploymentHandle, config: ChatStreamConfig) -> None:
        self.chat_stream = await ChatStream.create(model, config)
        # Admin token and API keys from the environment; a bad key configuration fails here.
        self.access = access_of(self.chat_stream)

    async def __del__(self) -> None:
        """Serve calls this on shutdown: pending bookkeeping and callbacks get a deadline."""
        await self.chat_stream.bookkeeping.drain(self.chat_stream.config.shutdown_drain_sec)

    @api.post("/chat_stream")
    async def chat_stream_api(self, request: Request) -> Response:
        if self.access.keys_on:  # API key and per-key limits first (serve_app/access.py)
            return await guard_chat_stream(self.chat_stream, request)
        return await self.chat_stream.handle_chat_stream_request(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.chat_stream.handle_chat_completions_request(request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await openai_route.models(self.chat_stream, request)

    @api.get("/v1/usage")
    async def usage(self, request: Request) -> dict:
        self.access.require_admin(request)
        return self.access.usage_report()

    async def read_body(self, request: Request) -> bytes:
        return await read_body(request, None, self.chat_stream.config.max_body_bytes)

    @api.get("/history")
    async def history(self, request: Request) -> Response:
        view = await self.chat_stream.open_session(request)
        return self.chat_stream.with_cookie(
            JSONResponse({"messages": view.record["messages"]}), view
        )

    @api.get("/prompt")
    async def prompt(self, request: Request) -> Response:
        """The prompt of the session's next turn: as text, and (engines with a tokenizer) token
        by token as the model gets it, where a control token is one entry marked special and
        the same characters typed by a user are ordinary pieces."""
        view = await self.chat_stream.open_session(request)
        chat_prompt = view.chat_prompt
        body: dict = {"prompt": chat_prompt.create_prompt()}
        tokens = chat_prompt.formatter.describe(chat_prompt.model_input())
        if tokens is not None:
            body["tokens"] = tokens
        return self.chat_stream.with_cookie(JSONResponse(body), view)

    @api.post("/clear_context")
    async def clear_context(self, request: Request) -> Response:
        view = await self.chat_stream.open_session(request)
        if view.stored:  # a client with no session has nothing to clear
            await self.chat_stream.change_session(view, session_state.clear())
        return self.chat_stream.with_cookie(JSONResponse({"cleared": True}), view)

    @api.get("/generation_params")
    async def get_generation_params(self, request: Request) -> Response:
        view = await self.chat_stream.open_session(request)
        params = self.chat_stream.generation_params(view)
        return self.chat_stream.with_cookie(JSONResponse(params), view)

    @api.put("/generation_params")
    async def set_generation_params(self, request: Request) -> Response:
        update = parse_generation_overrides(await self.read_body(request))
        view = await self.chat_stream.open_session(request)
        await self.chat_stream.change_session(view, session_state.set_params(update.as_dict()))
        params = self.chat_stream.generation_params(view)
        return self.chat_stream.with_cookie(JSONResponse(params), view)

    @api.post("/feedback")
    async def feedback(self, request: Request) -> Response:
        message_id, entry = parse_feedback(parse_json_object(await self.read_body(request)))
        view = await self.chat_stream.open_session(request)
        try:
            await self.chat_stream.change_session(
                view, session_state.add_feedback(message_id, entry)
            )
        except session_state.UnknownMessage:
            raise RequestRejected(
                404, "unknown_message_id", "message_id names no answer of this session"
            ) from None
        return self.chat_stream.with_cookie(JSONResponse({"recorded": True}), view)

    # Operator endpoints: the admin token (or loopback only without one; serve_app/access.py).
    @api.get("/load")
    async def load(self, request: Request) -> dict:
        self.access.require_admin(request)
        return await self.chat_stream.load()

    @api.get("/resource_usage")
    async def resource_usage(self, request: Request) -> dict:
        self.access.require_admin(request)
        # Ray's resource calls block: they run on a worker thread, not the event loop.
        return await asyncio.to_thread(_resource_usage)

    @api.get("/outcomes")
    async def outcomes(self, request: Request) -> dict:
        self.access.require_admin(request)
        return await self.chat_stream.store.outcome_totals()

    @api.get("/outcomes/ledger")
    async def outcome_ledger(
        self, request: Request, request_id: Annotated[list[str] | None, Query()] = None
    ) -> dict:
        self.access.require_admin(request)
        return await self.chat_stream.store.outcome_ledger(request_id)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 once the whole application (model included) is running, 503 before."""
        app_name = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)  # a blocking call to the controller
        app_status = status.applications.get(app_name)
        if app_status is None or app_status.status != "RUNNING":
            state = app_status.status if app_status else "UNKNOWN"
            return JSONResponse({"status": "starting", "application": state}, 503)
        return JSONResponse({"status": "ok"})

    @api.get("/health")
    async def health(self) -> Response:
        """/healthz under the name vLLM and TGI use (OpenAI-protocol clients such as guidellm
        probe it before a run)."""
        return await self.healthz()

    @api.get("/", include_in_schema=False)
    async def index(self) -> Response:
        index = STATIC_DIR / "index.html"
        if not index.exists():
            return JSONResponse(
                {"error": "not_found", "message": "the web UI is not installed"}, 404
            )
        return FileResponse(index)
