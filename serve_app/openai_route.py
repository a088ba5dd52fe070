"""`POST /v1/chat/completions` and `GET /v1/models` on ChatStream's request path.

Reached through the facade, `await chat_stream.handle_chat_completions_request(request,
request_body=None, callback=None)`, so a user's own route can sit in front, as with
`/chat_stream`. One request walks through:

    API key (401) -> parse (400/404, serve_app/openai_protocol.py) -> prompt from the client's
    messages with the ChatStream's formatter (400 context_length_exceeded if it does not fit)
    -> the key's quota (429 with a computed Retry-After) -> ChatStream.admit: a generation
    slot (429 when the queue is full) and the first chunk -> SSE events or one JSON body.

Stateless: the history is what the client sends; there is no session and no turn lock. From
admission on, ChatStream's `Exchange` decides the one outcome and does the bookkeeping (ledger,
metrics, callback), exactly as for `/chat_stream`. A chunk counts as sent once the server
resumed after handing its SSE event on; a non-streamed answer counts as sent when its body has
gone out, so a client that leaves while it is generated is `client_disconnected_before_streaming`.

Usage: prompt tokens are the formatter's count of the rendered prompt; completion tokens the
formatter's count of the text the client was sent (after stop strings cut it). `finish_reason`
is `length` when that count reached the request's token budget, else `stop`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.access import Access, access_of, answer_tokens
from serve_app.api_keys import QuotaExceeded, QuotaLease
from serve_app.chat_stream import ChatStream, GenerationFailed, OutcomeStreamingResponse
from serve_app.config import ChatStreamConfig
from serve_app.conversation import ChatPrompt
from serve_app.engines.base import ModelInput
from serve_app.exchange import Callback, Exchange
from serve_app.openai_protocol import (
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    ChatCompletionRequest,
    OpenAIHTTPError,
    StopMatcher,
    StreamEncoder,
    authentication_error,
    chat_completion,
    finish_reason,
    from_rejection,
    invalid_request,
    model_list,
    parse_chat_completion,
    rate_limited,
    server_error,
)
from serve_app.outcomes import is_client_disconnect
from serve_app.validation import REQUEST_ID_HEADER, RequestRejected, read_body, request_id_from

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
MOCK_MODEL_NAME = "mock"
# OpenAI's own request id header (the SDKs expose it as `_request_id`).
OPENAI_REQUEST_ID_HEADER = "x-request-id"


def served_model_name(config: ChatStreamConfig) -> str:
    """The name clients use in `model`: the configured one, else the model as given."""
    if config.served_model_name:
        return config.served_model_name
    if config.engine == "mock":
        return MOCK_MODEL_NAME
    return config.model or EMBEDDED_MODEL_NAME


@dataclass(eq=False)
class Ticket:
    """What the bookkeeping of one /v1 request needs once its outcome is known."""

    key_id: str
    lease: QuotaLease | None
    prompt_tokens: int
    sent: list[str] = field(default_factory=list)  # the answer's text as the client got it


def _id_headers(request_id: str) -> dict[str, str]:
    return {REQUEST_ID_HEADER: request_id, OPENAI_REQUEST_ID_HEADER: request_id}


async def refuse(chat_stream: ChatStream, request_id: str, error: OpenAIHTTPError) -> JSONResponse:
    """Count the refusal like any other (metrics, rejection ledger) and answer in OpenAI's
    shape."""
    await chat_stream.reject(
        request_id, RequestRejected(error.status_code, error.reason, error.message)
    )
    response = error.response()
    response.headers.update(_id_headers(request_id))
    return response


def build_prompt(
    chat_stream: ChatStream, completion: ChatCompletionRequest
) -> tuple[ModelInput, int, dict[str, Any]]:
    """The model input for the client's messages (token ids in which message contents are only
    text, see engines/chat_tokens.py), its token count and the generation parameters.

    The messages are used as sent (nothing dropped: that would change the answer); the app's
    `system_prompt` is added only when the client sent no system message. A prompt that leaves
    no room for an answer, or an explicit token budget over what the context leaves, is a 400
    `context_length_exceeded`; the default budget is capped to what the context leaves."""
    config, formatter = chat_stream.config, chat_stream.formatter
    has_system = any(m["role"] == "system" for m in completion.messages)
    system_prompt = "" if has_system else config.system_prompt
    prompt = ChatPrompt(completion.messages, formatter, system_prompt).model_input()
    prompt_tokens = formatter.input_tokens(prompt)
    room = formatter.context_length - prompt_tokens
    if room < 1:
        raise invalid_request(
            f"the prompt is {prompt_tokens} tokens but the model's context is "
            f"{formatter.context_length}; send fewer or shorter messages",
            "messages",
            "context_length_exceeded",
        )
    params = completion.generation_params(config.generation_defaults().model_dump())
    if "max_new_tokens" in completion.params and params["max_new_tokens"] > room:
        raise invalid_request(
            f"the prompt is {prompt_tokens} tokens and {params['max_new_tokens']} more were "
            f"asked for, but the model's context is {formatter.context_length}",
            "max_tokens",
            "context_length_exceeded",
        )
    params["max_new_tokens"] = min(params["max_new_tokens"], room)
    return prompt, prompt_tokens, params


def bookkeeping_callback(
    chat_stream: ChatStream, access: Access, ticket: Ticket, callback: Callback | None
) -> Callback:
    """The request's one callback: usage, metrics and the key's quota, then the user's own
    (a sync one on a worker thread, never on the event loop)."""

    async def on_finished(request: Request, message: str) -> None:
        if ticket.lease is not None:
            ticket.lease.release()
        completion_tokens = answer_tokens(chat_stream.formatter, "".join(ticket.sent))
        access.finished(ticket.key_id, message, ticket.prompt_tokens, completion_tokens)
        if callback is None:
            return
        if inspect.iscoroutinefunction(callback):
            result = callback(request, message)
        else:
            result = await asyncio.to_thread(callback, request, message)
        if inspect.isawaitable(result):
            await result

    return on_finished


async def handle_chat_completions(
    chat_stream: ChatStream,
    request: Request,
    request_body: bytes | None = None,
    callback: Callback | None = None,
) -> Response:
    """Answer one `/v1/chat/completions` request (see the module's docstring)."""
    access = access_of(chat_stream)
    config = chat_stream.config
    try:
        request_id = request_id_from(request.headers)
    except RequestRejected as rejected:
        return await refuse(chat_stream, uuid.uuid4().hex, from_rejection(rejected))
    key_id = access.authenticate(request)
    if key_id is None:
        access.rejected(None, "invalid_api_key")
        return await refuse(chat_stream, request_id, authentication_error())
    try:
        try:
            body = await read_body(request, request_body, config.max_body_bytes)
        except RequestRejected as rejected:  # 413 body_too_large
            raise from_rejection(rejected) from None
        completion = parse_chat_completion(body, served_model=served_model_name(config))
        prompt, prompt_tokens, params = build_prompt(chat_stream, completion)
    except OpenAIHTTPError as error:
        access.rejected(key_id, error.reason)
        return await refuse(chat_stream, request_id, error)
    try:
        lease = access.admit(key_id)
    except QuotaExceeded as exceeded:
        error = rate_limited(exceeded.message, exceeded.retry_after_s, exceeded.reason)
        return await refuse(chat_stream, request_id, error)

    ticket = Ticket(key_id, lease, prompt_tokens)
    on_finished = bookkeeping_callback(chat_stream, access, ticket, callback)
    try:
        exchange, first_chunk = await chat_stream.admit(
            request, request_id, prompt, params, on_finished
        )
    except RequestRejected as rejected:  # 429: not admitted
        lease.release()
        access.rejected(key_id, rejected.error)
        await chat_stream.reject(request_id, rejected)
        response = from_rejection(rejected).response()
        response.headers.update(_id_headers(request_id))
        return response
    except GenerationFailed as failed:  # the outcome (and the callback) are recorded
        response = server_error().response()
        response.headers.update(_id_headers(failed.request_id))
        return response
    # A client disconnect propagates (recorded as client_disconnected_before_streaming).
    request_id = exchange.request_id  # its key in the ledger (unique)

    if completion.stream:
        encoder = StreamEncoder(
            completion,
            prompt_tokens=prompt_tokens,
            count_tokens=functools.partial(answer_tokens, chat_stream.formatter),
        )
        return OutcomeStreamingResponse(
            exchange,
            stream_events(chat_stream, exchange, first_chunk, encoder, ticket, params),
            media_type=SSE_MEDIA_TYPE,
            headers={**SSE_HEADERS, **_id_headers(request_id)},
        )
    try:
        body_bytes = await whole_answer(
            chat_stream, exchange, first_chunk, completion, ticket, params
        )
    except BaseException as exc:
        exchange.finish(exc)
        if not isinstance(exc, Exception) or is_client_disconnect(exc):
            raise
        response = server_error().response()
        response.headers.update(_id_headers(request_id))
        return response
    return OutcomeStreamingResponse(
        exchange,
        send_body(exchange, body_bytes),
        media_type="application/json",
        headers={**_id_headers(request_id), "content-length": str(len(body_bytes))},
    )


async def _next_chunk(exchange: Exchange) -> str | None:
    """The answer's next non-empty chunk, or None at its end."""
    async for chunk in exchange.model_stream:
        if chunk:
            return chunk
    return None


async def stream_events(
    chat_stream: ChatStream,
    exchange: Exchange,
    chunk: str | None,
    encoder: StreamEncoder,
    ticket: Ticket,
    params: dict[str, Any],
) -> AsyncIterator[str]:
    """The SSE events of the answer from `chunk` (admit's first) on. The outcome is success
    only once the last event (`[DONE]`) went out; a stop string ends the answer early as a
    success and cancels the rest of the generation. An engine failure mid-stream ends it with
    an error event and no `[DONE]`."""
    error: BaseException | None = None
    event = ""
    try:
        try:
            while chunk is not None:
                event = encoder.feed(chunk)
                if encoder.stopped:
                    break
                if event:
                    yield event
                    exchange.sent.append(chunk)  # resumed: the event went out
                    ticket.sent[:] = encoder.text
                chunk = await _next_chunk(exchange)
        except Exception as exc:
            if is_client_disconnect(exc):
                raise
            exchange.finish(exc)  # unknown_error_occurred, recorded now
            yield server_error().sse()  # an error event: the SDKs raise APIError on it
            return
        tail = _ending(chat_stream, encoder, event, ticket, params)
        yield tail
        ticket.sent[:] = encoder.text
        exchange.sent.append(tail)
        if encoder.stopped:
            exchange.stop()
        else:
            exchange.completed = True
    except BaseException as exc:
        error = exc
        raise
    finally:
        exchange.finish(error)


def _ending(
    chat_stream: ChatStream,
    encoder: StreamEncoder,
    last_event: str,
    ticket: Ticket,
    params: dict[str, Any],
) -> str:
    """Everything after the last text event: the text before a stop string (if one matched),
    the held-back tail, `finish_reason`, usage if asked for, `[DONE]`."""
    head = last_event if encoder.stopped else ""
    answer = "".join(encoder.text) + encoder.matcher.held
    return head + encoder.end(
        prompt_tokens=ticket.prompt_tokens,
        completion_tokens=answer_tokens(chat_stream.formatter, answer),
        max_new_tokens=params["max_new_tokens"],
    )


async def whole_answer(
    chat_stream: ChatStream,
    exchange: Exchange,
    chunk: str | None,
    completion: ChatCompletionRequest,
    ticket: Ticket,
    params: dict[str, Any],
) -> bytes:
    """Generate the whole answer (cut at a stop string) and return the `chat.completion` body."""
    matcher = StopMatcher(completion.stop)
    parts: list[str] = []
    while chunk is not None:
        parts.append(matcher.feed(chunk))
        if matcher.stopped:
            break
        chunk = await _next_chunk(exchange)
    parts.append(matcher.flush())
    content = "".join(parts)
    completion_tokens = answer_tokens(chat_stream.formatter, content)
    ticket.sent[:] = [content]
    if matcher.stopped:
        exchange.model_stream.cancel()  # frees the engine's slot now, not after the send
        exchange.stopped_early = True
    body = chat_completion(
        model=completion.model,
        content=content,
        finish_reason=finish_reason(
            stopped=matcher.stopped,
            completion_tokens=completion_tokens,
            max_new_tokens=params["max_new_tokens"],
        ),
        prompt_tokens=ticket.prompt_tokens,
        completion_tokens=completion_tokens,
    )
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def send_body(exchange: Exchange, body: bytes) -> AsyncIterator[bytes]:
    """The non-streamed answer as one body; success once it went out."""
    error: BaseException | None = None
    try:
        yield body
        exchange.sent.append(body.decode())
        exchange.completed = True
    except BaseException as exc:
        error = exc
        raise
    finally:
        exchange.finish(error)


async def models(chat_stream: ChatStream, request: Request) -> Response:
    """`GET /v1/models`: the served model (401 without a valid key when keys are on)."""
    if access_of(chat_stream).authenticate(request) is None:
        return authentication_error().response()
    return JSONResponse(model_list(served_model_name(chat_stream.config), created=_STARTED))


_STARTED = int(time.time())
