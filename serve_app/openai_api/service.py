"""`POST /v1/chat/completions` and `POST /v1/completions` on ChatStream's request path,
statelessly: the history (or prompt) is what the client sends; no session, no turn lock.

One request: the edge's checks (API key, its stream limit) -> parse (400/404) -> plan the
prompt with the shared context fitting (400 context_length_exceeded) -> the checks before a
slot (`n`, the engine's features: 400 naming the engine) -> admission (429 when
the queue is full) -> SSE events or one JSON body. From admission on, the outcome, ledger,
metrics, usage and callback are the admission's, exactly as for `/chat_stream`. A streamed
answer counts as sent once `[DONE]` went out; a non-streamed one when its body has gone out, so
a client that leaves while it is generated is `client_disconnected_before_streaming`. Usage
and `finish_reason` are the engine's. Unknown fields the parser ignored are listed in a
response header and counted (ignored.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.access import Caller, Gate, Guard, caller_of
from serve_app.admission import Admission, GenerationFailed
from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.conversation import capped_params, plan_messages
from serve_app.engines.base import PromptFormatter
from serve_app.exchange import Callback, Exchange
from serve_app.model_contract import AnswerChunk, GenerationRequest, ModelInput, OutputConstraint
from serve_app.openai_api import ignored
from serve_app.openai_api.completions import (
    CompletionRequest,
    CompletionStreamEncoder,
    completion_choice,
    parse_completion,
    text_completion_of,
)
from serve_app.openai_api.encoding import (
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    StreamEncoder,
    chat_choice,
    chat_completion_of,
)
from serve_app.openai_api.protocol import ChatCompletionRequest, parse_chat_completion
from serve_app.openai_api.sampling import check_engine, choice_requests
from serve_app.openai_api.tool_answers import (
    ToolStreamEncoder,
    answer_with_calls,
    finish_reason,
    messages_with_tools,
    tool_constraint,
)
from serve_app.outcomes import is_client_disconnect
from serve_app.refusals import Refusal, invalid_request, server_error, unsupported_parameter
from serve_app.validation import OPENAI_REQUEST_ID_HEADER, REQUEST_ID_HEADER

ChoiceEncoder = StreamEncoder | ToolStreamEncoder | CompletionStreamEncoder
# A whole answer's body from its choices' answers (by index) and the exchange's usage.
WholeAnswer = Callable[[list[AnswerChunk], Exchange], dict]

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
    """The admission's encoder for a streamed answer: SSE chunks, then the ending. With `n`
    choices, one choice encoder each (`for_choice`): a choice's finish chunk goes out with its
    last chunk, the usage chunk and `[DONE]` once all are over."""

    def __init__(self, encoder: ChoiceEncoder, n: int = 1) -> None:
        self._encoders = [encoder] if n == 1 else [encoder.for_choice(i) for i in range(n)]
        self._finished: set[int] = set()

    def chunk(self, exchange: Exchange, chunk: AnswerChunk) -> str:
        encoder = self._encoders[chunk.index]
        counts = _counts(exchange)
        piece = ""
        if chunk.text or chunk.logprobs:
            piece = encoder.feed(chunk.text, logprobs=chunk.logprobs, **counts)
        if len(self._encoders) > 1 and chunk.finish_reason is not None:
            self._finished.add(chunk.index)
            piece += encoder.finish(finish_reason=chunk.finish_reason, **counts)
        return piece

    def end(self, exchange: Exchange) -> str:
        counts = _counts(exchange)
        if len(self._encoders) == 1:
            reason = exchange.finish_reason or "stop"
            return self._encoders[0].end(finish_reason=reason, **counts)
        unfinished = [
            encoder.finish(finish_reason="stop", **counts)
            for index, encoder in enumerate(self._encoders)
            if index not in self._finished
        ]
        return "".join(unfinished) + self._encoders[0].close(**counts)

    def error(self) -> str:
        return server_error().sse()  # an error event: the SDKs raise APIError on it


def _counts(exchange: Exchange) -> dict[str, int]:
    return {
        "prompt_tokens": exchange.prompt_tokens,
        "completion_tokens": exchange.completion_tokens,
    }


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
        """Answer one chat request (the body, if a route already read it; the callback)."""
        try:
            caller = caller_of(request) or await self._edge.enter(request, Guard.ADMITS)
            body = await self._edge.read_body(request, request_body)
            chat = parse_chat_completion(body, served_model=self.model_name)
            plan = plan_messages(
                messages_with_tools(chat),
                defaults=self._defaults,
                overrides=chat.params,
                formatter=self._formatter,
                system_prompt=self._config.system_prompt,
            )
            admitted = await self._admit(
                request,
                caller,
                chat,
                plan.model_input,
                plan.params,
                callback,
                constraint=tool_constraint(chat, self._config.engine),
            )
        except Refusal as refusal:
            return await self._edge.refuse(request, refusal, openai=True)
        except GenerationFailed as failed:  # the outcome (and the callback) are recorded
            return failure(failed.request_id)

        def choice(answered: AnswerChunk) -> dict:
            content, tool_calls = answer_with_calls(chat, answered.text)
            return chat_choice(
                index=answered.index,
                content=content,
                tool_calls=tool_calls,
                logprobs=answered.logprobs if chat.sampling.logprobs is not None else None,
                finish_reason=finish_reason(answered.finish_reason or "stop", tool_calls),
            )

        def whole(answers: list[AnswerChunk], exchange: Exchange) -> dict:
            return chat_completion_of(
                model=chat.model,
                choices=[choice(answered) for answered in answers],
                **_counts(exchange),
            )

        encoder = StreamEncoder(chat)
        if chat.tool_choice.mode != "none":
            encoder = ToolStreamEncoder(chat, encoder)
        return await self._answer(chat, admitted, encoder, whole, "chat_completions")

    async def completions(self, request: Request) -> Response:
        """Answer one `/v1/completions` request (text or token ids, `echo`, legacy logprobs)."""
        try:
            caller = caller_of(request) or await self._edge.enter(request, Guard.ADMITS)
            body = await self._edge.read_body(request, None)
            text = parse_completion(body, served_model=self.model_name)
            model_input, echoed, params = plan_prompt(
                text, self._formatter, self._defaults, token_ids=self._config.engine != "mock"
            )
            admitted = await self._admit(request, caller, text, model_input, params, None)
        except Refusal as refusal:
            return await self._edge.refuse(request, refusal, openai=True)
        except GenerationFailed as failed:
            return failure(failed.request_id)

        def choice(answered: AnswerChunk) -> dict:
            return completion_choice(
                index=answered.index,
                text=answered.text,
                echoed=echoed,
                logprobs=answered.logprobs if text.sampling.logprobs is not None else None,
                finish_reason=answered.finish_reason or "stop",
            )

        def whole(answers: list[AnswerChunk], exchange: Exchange) -> dict:
            choices = [choice(answered) for answered in answers]
            return text_completion_of(model=text.model, choices=choices, **_counts(exchange))

        encoder = CompletionStreamEncoder(text, echoed)
        return await self._answer(text, admitted, encoder, whole, "completions")

    async def _admit(
        self,
        request: Request,
        caller: Caller,
        parsed: ChatCompletionRequest | CompletionRequest,
        model_input: ModelInput,
        params: dict[str, Any],
        callback: Callback | None,
        *,
        constraint: OutputConstraint | None = None,
    ) -> tuple[Exchange, AnswerChunk | None]:
        """The checks before a slot is taken (n, the engine's features), then the admission.
        `constraint`: a forced tool call's, which leaves no room for a `response_format`."""
        fields = parsed.sampling.generation_fields()
        if constraint is not None:
            if fields["constraint"] is not None:
                raise invalid_request(
                    "'response_format' cannot constrain an answer that 'tool_choice' forces "
                    "to be a tool call; send one of them",
                    "response_format",
                )
            fields["constraint"] = constraint
        generation = GenerationRequest(
            model_input,
            GenerationParams(**params),
            stop=parsed.stop,
            seed=parsed.seed,
            session=parsed.session_key,
            **fields,
        )
        n = parsed.sampling.n
        check_choices(n, self._config.max_ongoing_requests)
        check_engine(self._config.engine, generation)
        return await self._admission.admit(
            request, caller, choice_requests(generation, n), callback
        )

    async def _answer(
        self,
        parsed: ChatCompletionRequest | CompletionRequest,
        admitted: tuple[Exchange, AnswerChunk | None],
        encoder: ChoiceEncoder,
        whole: WholeAnswer,
        route: str,
    ) -> Response:
        """The admitted request's answer: SSE events, or one JSON body once it is whole. A
        client disconnect propagates (recorded as client_disconnected_before_streaming)."""
        exchange, first = admitted
        headers = {**id_headers(exchange.request_id), **ignored.report(parsed.ignored, route)}
        if parsed.stream:
            events = self._admission.relay(exchange, first, SSEAnswer(encoder, parsed.sampling.n))
            return self._admission.response(
                exchange, events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **headers}
            )
        try:
            answers = await self._admission.collect_choices(exchange, first, parsed.sampling.n)
        except Exception as exc:  # the outcome is recorded
            if is_client_disconnect(exc):
                raise
            return failure(exchange.request_id)
        body = json.dumps(whole(answers, exchange), ensure_ascii=False, separators=(",", ":"))
        data = body.encode()
        return self._admission.response(
            exchange,
            self._admission.send_once(exchange, data),
            media_type="application/json",
            headers={**headers, "content-length": str(len(data))},
        )


def plan_prompt(
    text: CompletionRequest,
    formatter: PromptFormatter,
    defaults: dict[str, Any],
    *,
    token_ids: bool,
) -> tuple[ModelInput, str, dict[str, Any]]:
    """A completion's model input, the echoed prompt (with `echo`) and its parameters; token ids
    are checked against the vocabulary (400 where the engine has no tokenizer, `token_ids`
    False), the prompt and budget against the context (400 context_length_exceeded)."""
    tokenizer = getattr(formatter, "tokenizer", None)
    prompt = text.prompt
    if isinstance(prompt, list):
        if not token_ids or tokenizer is None:
            raise unsupported_parameter("prompt", "as token ids needs an engine with a tokenizer")
        vocab = len(tokenizer)
        if max(prompt) >= vocab:
            raise invalid_request(
                f"'prompt' holds a token id over the vocabulary ({vocab})", "prompt"
            )
    prompt_tokens = formatter.input_tokens(prompt)
    room = formatter.context_length - prompt_tokens
    asked = text.params.get("max_new_tokens")
    if room < 1 or (asked is not None and asked > room):
        raise invalid_request(
            f"the prompt is {prompt_tokens} tokens and {asked or 1} more were asked for, but the "
            f"model's context is {formatter.context_length}",
            "prompt" if room < 1 else "max_tokens",
            "context_length_exceeded",
        )
    params = capped_params({**defaults, **text.params}, prompt_tokens, formatter.context_length)
    echoed = ""
    if text.echo:
        echoed = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    return prompt, echoed, params


def check_choices(n: int, slots: int) -> None:
    """`n` choices are n generations at once, each holding one of a replica's `slots`
    (`max_ongoing_requests`; serve_app/choices.py): more than that could never run together."""
    if n > slots:
        raise invalid_request(
            f"'n' is {n}, more than the {slots} generations this server runs at once "
            "(max_ongoing_requests)",
            "n",
        )


def failure(request_id: str) -> JSONResponse:
    """The 500 of a request whose engine failed before its answer could be sent."""
    response = server_error().response(openai=True)
    response.headers.update(id_headers(request_id))
    return response
