"""Your own routes in front of both APIs, through the ChatStream facade.

    serve run serve_app.examples.own_routes:build engine=mock

`POST /my/chat` and `POST /my/v1/chat/completions` call the facade with a synchronous
completion callback; `GET /my/callbacks` shows what each callback saw, including the thread it
ran on (callbacks never run on the event loop). The facade applies the HTTP edge's checks
itself, so with API keys configured these routes need a key exactly as ChatStream's own do.
"""

import threading

from fastapi import FastAPI, Request
from ray import serve

from serve_app.builder import build_app
from serve_app.chat_stream import ChatStream
from serve_app.config import ChatStreamConfig, parse_args
from serve_app.ingress import INGRESS_MAX_ONGOING_REQUESTS

app = FastAPI()
facade: dict[str, ChatStream] = {}  # filled when the ingress replica starts
callback_log: list[dict] = []


def record(request: Request, message: str) -> None:
    callback_log.append(
        {
            "request_id": request.headers.get("X-ChatStream-Request-Id"),
            "message": message,
            "thread": threading.current_thread().name,
        }
    )


@app.post("/my/chat")
async def my_chat(request: Request):
    return await facade["chat_stream"].handle_chat_stream_request(request, callback=record)


@app.post("/my/v1/chat/completions")
async def my_completions(request: Request):
    return await facade["chat_stream"].handle_chat_completions_request(request, callback=record)


@app.get("/my/callbacks")
async def callbacks():
    return callback_log


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


def install(chat_stream: ChatStream) -> None:
    # Shipped by reference (see seed_endpoints.py): it fills the dict the routes read.
    facade["chat_stream"] = chat_stream


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class OwnRoutesIngress:
    async def __init__(self, model, config: ChatStreamConfig) -> None:
        install(await ChatStream.create(model, config))


def build(args: dict | None = None):
    return build_app(parse_args(args), ingress=OwnRoutesIngress)
