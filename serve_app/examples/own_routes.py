"""Your own routes in front of both APIs, through the ChatStream facade.

    serve run serve_app.examples.own_routes:build engine=mock

The ingress builds its FastAPI app when the replica starts (Serve's `__serve_build_asgi_app__`),
around the replica's `ChatStream`: no module globals. `POST /my/chat` and
`POST /my/v1/chat/completions` call the facade with a synchronous completion callback;
`GET /my/callbacks` shows what each callback saw, including the thread it ran on (callbacks
never run on the event loop). The facade applies the HTTP edge's checks itself, so with API
keys configured these routes need a key exactly as ChatStream's own do.
"""

import threading

from fastapi import FastAPI, Request
from ray import serve

from serve_app.builder import build_app
from serve_app.chat_stream import ChatStream
from serve_app.config import ChatStreamConfig, parse_args
from serve_app.ingress import INGRESS_MAX_ONGOING_REQUESTS


def make_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    callback_log: list[dict] = []

    def record(request: Request, message: str) -> None:
        request_id = request.headers.get("X-ChatStream-Request-Id")
        thread = threading.current_thread().name
        callback_log.append({"request_id": request_id, "message": message, "thread": thread})

    @app.post("/my/chat")
    async def my_chat(request: Request):
        return await chat_stream.handle_chat_stream_request(request, callback=record)

    @app.post("/my/v1/chat/completions")
    async def my_completions(request: Request):
        return await chat_stream.handle_chat_completions_request(request, callback=record)

    app.add_api_route("/my/callbacks", lambda: callback_log, methods=["GET"])
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    return app


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class OwnRoutesIngress:
    async def __init__(self, model, config: ChatStreamConfig) -> None:
        self.chat_stream = await ChatStream.create(model, config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_app(self.chat_stream)


def build(args: dict | None = None):
    return build_app(parse_args(args), ingress=OwnRoutesIngress)
