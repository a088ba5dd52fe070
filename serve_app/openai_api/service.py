"""`POST /v1/chat/completions` on ChatStream's request path, statelessly: the history is what
the client sends; there is no session and no turn lock.

One request: the edge's checks (API key, its stream limit) -> parse (400/404) -> plan the
prompt with the shared context fitting (400 context_length_exceeded) -> admission (429 when
the queue is full) -> SSE events or one JSON body. From admission on, the outcome, ledger,
metrics, usage and callback are the admission's, exactly as for `/chat_stream`. A streamed
answer counts as sent once `[DONE]` went out; a non-streamed one when its body has gone out, so
a client that leaves while it is generated is `client_disconnected_before_streaming`. Usage
and `finish_reason` are the engine's.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.access import Gate, Guard, caller_of
from serve_app.admission import Admission, GenerationFailed
from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.conversation import plan_messages
from serve_app.engines.base import PromptFormatter
from serve_app.exchange import Callback, Exchange
from serve_app.model_contract import AnswerChunk, GenerationRequest
from serve_app.openai_api.encoding import (
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    StreamEncoder,
    chat_completion,
)
from serve_app.openai_api.protocol import parse_chat_completion
from serve_app.openai_api.tool_answers import (
    ToolStreamEncoder,
    answer_with_calls,
    finish_reason,
    messages_with_tools,
    tool_constraint,
)
from serve_app.outcomes import is_client_disconnect
from serve_app.refusals import Refusal, server_error
from serve_app.validation import OPENAI_REQUEST_ID_HEADER, REQUEST_ID_HEADER

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
MOCK_MODEL_NAME = "mock"


def served_model_name(config: ChatStreamConfig) -> str:
    """The name clients use in `model`: the configured one, else the model as given."""
    if config.served_model_name:
        return config.served_model_name
    if config.engine == "mock":
        return MOCK_MODEL_NAME
    return config.model or EMBEDDED_MODEL_NAME


def id_headers(request_id: str) -> dict[str, str]:
    return {REQUEST_ID_HEADER: request_id, OPENAI_REQUEST_ID_HEADER: request_id}


class SSEAnswer:
    """The admission's encoder for a streamed answer: SSE chunks, then the ending."""

    def __init__(self, encoder: StreamEncoder | ToolStreamEncoder) -> None:
        self._encoder = encoder

    def chunk(self, exchange: Exchange, chunk: AnswerChunk) -> str:
        if not chunk.text:
            return ""
        return self._encoder.feed(
            chunk.text,
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
        )

    def end(self, exchange: Exchange) -> str:
        return self._encoder.end(
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
            finish_reason=exchange.finish_reason or "stop",
        )

    def error(self) -> str:
        return server_error().sse()  # an error event: the SDKs raise APIError on it


class OpenAIService:
    """Runs `/v1/chat/completions` requests (also reachable through the ChatStream facade)."""

    def __init__(
        self,
        config: ChatStreamConfig,
        formatter: PromptFormatter,
        edge: Gate,
        admission: Admission,
    ) -> None:
        self.model_name = served_model_name(config)
        self._config = config
        self._formatter = formatter
        self._edge = edge
        self._admission = admission
        self._defaults = config.generation_defaults().model_dump()

    async def chat_completions(
        self, request: Request, request_body: bytes | None, callback: Callback | None
    ) -> Response:
        """Answer one request (the body, if a route already read it; the callback, if any)."""
        try:
            caller = caller_of(request) or await self._edge.enter(request, Guard.ADMITS)
            body = await self._edge.read_body(request, request_body)
            completion = parse_chat_completion(body, served_model=self.model_name)
            plan = plan_messages(
                messages_with_tools(completion),
                defaults=self._defaults,
                overrides=completion.params,
                formatter=self._formatter,
                system_prompt=self._config.system_prompt,
            )
            generation = GenerationRequest(
                plan.model_input,
                GenerationParams(**plan.params),
                stop=completion.stop,
                seed=completion.seed,
                constraint=tool_constraint(completion, self._config.engine),
            )
            exchange, first = await self._admission.admit(request, caller, generation, callback)
        except Refusal as refusal:
            return await self._edge.refuse(request, refusal, openai=True)
        except GenerationFailed as failed:  # the outcome (and the callback) are recorded
            return failure(failed.request_id)
        # A client disconnect propagates (recorded as client_disconnected_before_streaming).
        headers = id_headers(exchange.request_id)
        if completion.stream:
            encoder = StreamEncoder(completion)
            if completion.tool_choice.mode != "none":
                encoder = ToolStreamEncoder(completion, encoder)
            events = self._admission.relay(exchange, first, SSEAnswer(encoder))
            return self._admission.response(
                exchange, events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **headers}
            )
        try:
            content = await self._admission.collect(exchange, first)
        except Exception as exc:  # the outcome is recorded
            if is_client_disconnect(exc):
                raise
            return failure(exchange.request_id)
        content, tool_calls = answer_with_calls(completion, content)
        answer = chat_completion(
            model=completion.model,
            content=content,
            tool_calls=tool_calls,
            finish_reason=finish_reason(exchange.finish_reason or "stop", tool_calls),
            prompt_tokens=exchange.prompt_tokens,
            completion_tokens=exchange.completion_tokens,
        )
        body = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
        return self._admission.response(
            exchange,
            self._admission.send_once(exchange, body),
            media_type="application/json",
            headers={**headers, "content-length": str(len(body))},
        )


def failure(request_id: str) -> JSONResponse:
    """The 500 of a request whose engine failed before its answer could be sent."""
    response = server_error().response(openai=True)
    response.headers.update(id_headers(request_id))
    return response
