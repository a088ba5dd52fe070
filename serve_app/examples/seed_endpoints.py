"""ChatStream's original three endpoint examples, as written, on Ray Serve.

    serve run serve_app.examples.seed_endpoints:build engine=mock

Routes are plain module-level FastAPI functions, as in the original post; the ingress
replica's constructor creates the module's `chat_stream`. `GET /callbacks` shows what the
completion callback saw (for the tests and for curious readers).
"""

import json

from fastapi import FastAPI, Request
from ray import serve

from serve_app.builder import build_app
from serve_app.chat_stream import ChatStream
from serve_app.config import ChatStreamConfig, parse_args
from serve_app.ingress import INGRESS_MAX_ONGOING_REQUESTS

app = FastAPI()
chat_stream: ChatStream  # set when the ingress replica starts
callback_log: list[dict] = []


# 1. The plain form.
@app.post("/chat_stream")
async def stream_api(request: Request):
    # handling FastAPI/Starlette's Request
    response = await chat_stream.handle_chat_stream_request(request)
    return response


# 2. Intercepting the request: the body can be read only once, so hand it over.
@app.post("/chat_stream_intercepted")
async def intercepted_stream_api(request: Request):
    request_body = await request.body()
    data = json.loads(request_body)

    user_input = data["user_input"]
    regenerate = data["regenerate"]

    print(f"user_input:{user_input} regenerate:{regenerate}")

    response = await chat_stream.handle_chat_stream_request(request, request_body)

    return response


# 3. The completion callback: called once the stream is over, with the session at hand.
@app.post("/chat_stream_with_callback")
async def stream_api_with_callback(request: Request):
    def callback_func(request, message):
        session_mgr = getattr(request.state, "session", None)
        session = session_mgr.get_session()
        chat_prompt = session.get("chat_prompt")
        print(chat_prompt.create_prompt())
        callback_log.append(
            {
                "request_id": request.headers.get("X-ChatStream-Request-Id"),
                "message": message,
                "prompt": chat_prompt.create_prompt(),
            }
        )

    response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)

    return response


@app.get("/callbacks")
async def callbacks():
    return callback_log


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


def install_chat_stream(instance: ChatStream) -> None:
    # Serve ships the ingress class below by value (its methods get a copy of this module's
    # globals), so a `global` statement there would not reach the routes. This function is
    # shipped by reference: it sets the global the routes read.
    global chat_stream
    chat_stream = instance


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class SeedExampleIngress:
    async def __init__(self, model, config: ChatStreamConfig) -> None:
        install_chat_stream(await ChatStream.create(model, config))


def build(args: dict | None = None):
    return build_app(parse_args(args), ingress=SeedExampleIngress)
