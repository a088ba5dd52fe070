"""The OpenAI-protocol user of the load test: `POST /v1/chat/completions`, streamed (SSE) and
not, reading to the end, quitting mid-stream, or quitting before the first chunk; and
`POST /v1/completions` with an unknown field (answered, the field listed as ignored), a
structured output (`response_format` json_schema: the answer must match the schema), and `n`
choices (`--openai-choices`, streamed or not: one request, one outcome, every choice whole).
Each request carries `X-ChatStream-Request-Id`, so it joins the exact accounting like the
/chat_stream users.

Outcome each task implies:
- read the SSE stream to `data: [DONE]`, or a non-streamed answer -> success
- read 1-3 text events of a long answer, then close -> client_disconnected_while_streaming
  (or success, if the answer had already ended: see loadtest/quits.py)
- close before the first chunk can exist (queued, or before the mock's first token)
  -> client_disconnected_before_streaming (or no entry / a 429 on its way, as for
  EarlyQuitterUser)
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests
from locust import between, task

from loadtest.accounting import SUCCESS
from loadtest.client import REQUEST_ID_HEADER, prompt
from loadtest.run_state import RUN
from loadtest.stream_user import Quitter, Sender

IGNORED_FIELDS_HEADER = "x-chatstream-ignored-fields"  # serve_app/openai_api/ignored.py
API_KEY_ENV = "CHATSTREAM_LOADTEST_API_KEY"  # sent as the bearer key when the service has keys


class StreamCut(Exception):
    """The SSE stream ended without `data: [DONE]`, or carried an error event."""


def sse_data(response: Any) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events body, as they arrive."""
    buffer = ""
    for raw in response.iter_content(chunk_size=None):
        buffer += raw.decode("utf-8") if isinstance(raw, bytes) else raw
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            for line in event.splitlines():
                if line.startswith("data:"):
                    yield line[5:].strip()


class CompletionChunks:
    """The text of each chunk of a `chat.completion.chunk` stream, as it arrives. Checks the
    stream's shape, and ends normally only at `data: [DONE]`; `finished` says whether a chunk
    with a finish_reason (the end of the answer) came."""

    def __init__(self, response: Any, n: int = 1) -> None:
        self.response = response
        self.n = n  # choices: the answer is whole once each of them has its finish_reason
        self.ended: set[int] = set()

    @property
    def finished(self) -> bool:
        return len(self.ended) >= self.n

    def __iter__(self) -> Iterator[str]:
        first = True
        for data in sse_data(self.response):
            if data == "[DONE]":
                if not self.finished:
                    raise StreamCut("[DONE] without a finish_reason")
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamCut(f"error event: {chunk['error']}")
            if chunk.get("object") != "chat.completion.chunk":
                raise StreamCut(f"not a chat.completion.chunk: {data[:200]}")
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if first and delta.get("role") != "assistant":
                    raise StreamCut("the first chunk carries no role")
                first = False
                if choice.get("finish_reason") in ("stop", "length"):
                    self.ended.add(choice["index"])
                if delta.get("content"):
                    yield delta["content"]
        raise StreamCut("the stream ended without data: [DONE]")


STREAM_CUT = (StreamCut, requests.RequestException, ValueError)


# A JSON schema whose every value is bounded, so that any engine completes it within 64 tokens.
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "rank": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["city", "rank"],
            "additionalProperties": False,
        },
    },
}


def finished(answer: dict) -> bool:
    return answer["choices"][0]["finish_reason"] in ("stop", "length")


def all_finished(answer: dict, n: int) -> bool:
    """`n` choices, indexed 0 to n-1, each whole."""
    choices = answer["choices"]
    return [c["index"] for c in choices] == list(range(n)) and all(
        c["finish_reason"] in ("stop", "length") for c in choices
    )


def matches_city(answer: dict) -> bool:
    """The answer is whole and is JSON of CITY_FORMAT's shape."""
    choice = answer["choices"][0]
    value = json.loads(choice["message"]["content"])
    return (
        choice["finish_reason"] == "stop"
        and set(value) == {"city", "rank"}
        and isinstance(value["city"], str)
        and len(value["city"]) <= 12
        and type(value["rank"]) is int
        and 0 <= value["rank"] <= 99
    )


class OpenAIClient(Quitter):
    """What the users of the `/v1` API share: the served model, the bearer key, OpenAI's error
    object, and the quitting tasks (loadtest/stream_user.py)."""

    abstract = True
    stream_cut = STREAM_CUT

    def on_start(self) -> None:
        key = os.environ.get(API_KEY_ENV, "")
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        models = self.client.get("/v1/models", headers=self.auth, name="/v1/models").json()
        self.model = models["data"][0]["id"]

    def error_code(self, response: requests.Response) -> str:
        """OpenAI's error object: its `code` is the server's reason."""
        try:
            error = response.json()["error"]
            return str(error.get("code") or error.get("type"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"http_{response.status_code}"


class OpenAIUser(OpenAIClient):
    """Talks to /v1/chat/completions as an OpenAI SDK client would."""

    behaviour = "openai"
    weight = 2  # set from --openai-weight at init
    wait_time = between(0.5, 1.5)
    id_prefix, label = "oai", "openai"

    def ask(self, question: str, path: str = "/v1/chat/completions", **fields: Any) -> Any:
        """The sender of a request: `ask(...)(request_id, name)` posts it (a chat question, or
        with `path="/v1/completions"` a text prompt)."""
        if path == "/v1/completions":
            body = {"model": self.model, "prompt": question, **fields}
        else:
            body = {"model": self.model, "messages": [{"role": "user", "content": question}],
                    **fields}  # fmt: skip

        def send(request_id: str, name: str) -> Any:
            return self.client.post(
                path,
                json=body,
                headers={REQUEST_ID_HEADER: request_id, **self.auth},
                stream=True,
                catch_response=True,
                name=name,
                timeout=(5.0, RUN.options.request_timeout),
            )  # fmt: skip

        return send

    @task(3)
    def stream_to_end(self) -> None:
        request_id = RUN.new_id("oai")
        send = self.ask(
            prompt(random.randint(3, 12)),
            max_tokens=RUN.options.answer_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        with send(request_id, "openai stream") as response:
            if response.status_code != 200:
                return self.refused(response, request_id, "too_many_requests")
            self.read_to_end(response, request_id, CompletionChunks(response))

    @task(1)
    def whole_answer(self) -> None:
        send = self.ask(prompt(4), max_tokens=RUN.options.answer_tokens)
        self.check_whole(send, "openai whole", lambda answer, _: finished(answer))

    @task(1)
    def structured_answer(self) -> None:
        """`response_format` json_schema, as `client.chat.completions.parse` sends it: the
        answer must parse and match the schema (decoded under it, whatever the model)."""
        send = self.ask(prompt(4), max_tokens=max(64, RUN.options.answer_tokens),
                        response_format=CITY_FORMAT)  # fmt: skip
        self.check_whole(send, "openai structured", lambda answer, _: matches_city(answer))

    @task(1)
    def choices(self) -> None:
        """`n` choices in one request (one admission, one outcome), streamed or whole: every
        choice must come, by index, and end."""
        n = RUN.options.openai_choices
        tokens = RUN.options.answer_tokens
        if random.random() < 0.5:
            send = self.ask(prompt(4), max_tokens=tokens, n=n)
            self.check_whole(send, "openai n choices", lambda answer, _: all_finished(answer, n))
            return
        request_id = RUN.new_id("oai")
        send = self.ask(prompt(4), max_tokens=tokens, n=n, stream=True)
        with send(request_id, "openai n choices stream") as response:
            if response.status_code != 200:
                return self.refused(response, request_id, "too_many_requests")
            self.read_to_end(response, request_id, CompletionChunks(response, n))

    @task(1)
    def text_completion(self) -> None:
        """`/v1/completions` with a field the server does not know: answered, and the
        response lists the field as ignored."""
        send = self.ask(prompt(4), path="/v1/completions", max_tokens=RUN.options.answer_tokens,
                        cache_control={"type": "ephemeral"})  # fmt: skip
        self.check_whole(
            send,
            "openai text completion",
            lambda answer, headers: (
                finished(answer) and headers.get(IGNORED_FIELDS_HEADER) == "cache_control"
            ),
        )

    def check_whole(
        self, send: Sender, name: str, check: Callable[[dict, Mapping[str, str]], bool]
    ) -> None:
        """Post a non-streamed request and record it: success, with a violation unless `check`
        accepts the answer (and its headers)."""
        request_id = RUN.new_id("oai")
        with send(request_id, name) as response:
            if response.status_code != 200:
                return self.refused(response, request_id, "too_many_requests")
            try:
                answer = response.json()
                ok = check(answer, response.headers)
            except (ValueError, KeyError, IndexError, TypeError, requests.RequestException) as exc:
                ok, answer = False, repr(exc)
            violation = "" if ok else f"bad answer to {name}: {answer}"
            RUN.record(request_id, self.behaviour, SUCCESS, violation=violation)
            if ok:
                response.success()
            else:
                response.failure(f"bad answer to {name}")

    def streamed(self, words: int, tokens: int) -> Sender:
        return self.ask(prompt(words), max_tokens=tokens, stream=True)

    def stream_events(self, response: Any) -> CompletionChunks:
        return CompletionChunks(response)
