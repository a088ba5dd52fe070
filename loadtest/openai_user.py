"""The OpenAI-protocol user of the load test: `POST /v1/chat/completions`, streamed (SSE) and
not, reading to the end, quitting mid-stream, or quitting before the first chunk. Each request
carries `X-ChatStream-Request-Id`, so it joins the exact accounting like the /chat_stream users.

The locustfile imports `OpenAIUser` and hands it its run state (`OpenAIUser.state = RUN`): this
module must not import the locustfile, which Locust loads under another module name.

Outcome each task implies:
- read the SSE stream to `data: [DONE]`, or a non-streamed answer -> success
- read 1-3 text events of a long answer, then close -> client_disconnected_while_streaming
- close before the first chunk can exist (queued, or before the mock's first token)
  -> client_disconnected_before_streaming (or no entry / a 429 on its way, as for
  EarlyQuitterUser)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import gevent
import requests
from locust import HttpUser, between, task

from loadtest.accounting import (
    ABSENT,
    BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    WHILE_STREAMING,
    rejected,
)

REQUEST_ID_HEADER = "X-ChatStream-Request-Id"
API_KEY_ENV = "CHATSTREAM_LOADTEST_API_KEY"  # sent as the bearer key when the service has keys
WORDS = ("river", "cloud", "lantern", "harbor", "meadow", "signal", "copper", "orbit", "garden")


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


def text_events(response: Any) -> Iterator[str]:
    """The text of each chunk of a `chat.completion.chunk` stream; checks its shape and ends
    normally only at `data: [DONE]`."""
    first, finished = True, False
    for data in sse_data(response):
        if data == "[DONE]":
            if not finished:
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
            finished = finished or choice.get("finish_reason") in ("stop", "length")
            if delta.get("content"):
                yield delta["content"]
    raise StreamCut("the stream ended without data: [DONE]")


def _prompt(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


class OpenAIUser(HttpUser):
    """Talks to /v1/chat/completions as an OpenAI SDK client would."""

    behaviour = "openai"
    weight = 2  # set from --openai-weight at init
    wait_time = between(0.5, 1.5)
    state: Any = None  # the locustfile's RunState (`run` is Locust's)

    def on_start(self) -> None:
        key = os.environ.get(API_KEY_ENV, "")
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        models = self.client.get("/v1/models", headers=self.auth, name="/v1/models").json()
        self.model = models["data"][0]["id"]

    def post(self, body: dict[str, Any], request_id: str, name: str) -> Any:
        return self.client.post(
            "/v1/chat/completions",
            json={"model": self.model, "messages": [{"role": "user", "content": body.pop("q")}],
                  **body},
            headers={REQUEST_ID_HEADER: request_id, **self.auth},
            stream=True,
            catch_response=True,
            name=name,
            timeout=(5.0, self.state.options.request_timeout),
        )  # fmt: skip

    def record(self, request_id: str, *accepts: str, violation: str = "") -> None:
        self.state.record(request_id, self.behaviour, *accepts, violation=violation)

    def refused(self, response: Any, request_id: str) -> None:
        """A non-200 answer: OpenAI's error object; its `code` is the server's reason."""
        run = self.state
        if response.status_code == 0:  # no HTTP answer
            ok = run.errors_expected
            self.record(
                request_id, ABSENT, UNKNOWN_ERROR, BEFORE_STREAMING,
                violation="" if ok else f"no answer: {response.error}",
            )  # fmt: skip
            response.failure(f"no answer: {response.error}")
            return
        try:
            error = response.json()["error"]
            code = str(error.get("code") or error.get("type"))
        except (ValueError, KeyError, TypeError, AttributeError):
            code = f"http_{response.status_code}"
        if response.status_code == 500 and code == UNKNOWN_ERROR:  # failed before its first chunk
            ok = run.errors_expected
            self.record(request_id, UNKNOWN_ERROR, violation="" if ok else "HTTP 500")
            response.failure("500 unknown_error_occurred")
            return
        if response.status_code >= 500 and code != "store_unavailable":  # a proxy error
            ok = run.errors_expected
            self.record(request_id, ABSENT, violation="" if ok else f"HTTP {response.status_code}")
            response.failure(f"HTTP {response.status_code}")
            return
        allowed = run.refusal_codes("too_many_requests")
        started_at = response.request_meta.get("start_time", time.time())
        unrecorded = (ABSENT,) if run.overlaps_store_fault(started_at) else ()
        violation = "" if code in allowed else f"unexpected HTTP {response.status_code} {code}"
        self.record(request_id, rejected(code), *unrecorded, violation=violation)
        response.failure(violation or f"{response.status_code} {code} (expected when saturated)")

    @task(3)
    def stream_to_end(self) -> None:
        request_id = self.state.new_id("oai")
        body = {
            "q": _prompt(random.randint(3, 12)),
            "max_tokens": self.state.options.answer_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with self.post(body, request_id, "openai stream") as response:
            if response.status_code != 200:
                return self.refused(response, request_id)
            try:
                for _ in text_events(response):
                    pass
            except (StreamCut, requests.RequestException, ValueError) as exc:
                ok = self.state.errors_expected
                self.record(request_id, UNKNOWN_ERROR, violation="" if ok else f"cut: {exc}")
                response.failure(f"stream cut: {exc}")
                return
            self.record(request_id, SUCCESS)
            response.success()

    @task(1)
    def whole_answer(self) -> None:
        request_id = self.state.new_id("oai")
        body = {"q": _prompt(4), "max_tokens": self.state.options.answer_tokens}
        with self.post(body, request_id, "openai whole") as response:
            if response.status_code != 200:
                return self.refused(response, request_id)
            try:
                answer = response.json()
                ok = answer["choices"][0]["finish_reason"] in ("stop", "length")
            except (ValueError, KeyError, IndexError, requests.RequestException) as exc:
                ok, answer = False, repr(exc)
            self.record(request_id, SUCCESS, violation="" if ok else f"bad answer: {answer}")
            if ok:
                response.success()
            else:
                response.failure("bad chat.completion")

    @task(2)
    def quit_mid_stream(self) -> None:
        run = self.state
        if run.quiet:
            return
        request_id = run.new_id("oai")
        # Long enough that the service cannot finish before the close reaches it.
        body = {"q": _prompt(5), "max_tokens": min(run.options.long_answer_tokens, 1024),
                "stream": True}  # fmt: skip
        want = random.randint(1, 3)
        run.quitters_in_flight += 1
        try:
            with self.post(body, request_id, "openai quit mid-stream") as response:
                if response.status_code != 200:
                    return self.refused(response, request_id)
                got = 0
                try:
                    for _ in text_events(response):
                        got += 1
                        if got >= want:
                            break
                    else:
                        self.record(request_id, SUCCESS)
                        response.success()
                        return
                except (StreamCut, requests.RequestException, ValueError) as exc:
                    ok = run.errors_expected
                    self.record(request_id, UNKNOWN_ERROR, violation="" if ok else f"cut: {exc}")
                    response.failure(f"stream cut: {exc}")
                    return
                response.close()  # the service sees the client leave
                self.record(request_id, WHILE_STREAMING)
                response.success()
        finally:
            run.quitters_in_flight -= 1

    @task(1)
    def quit_before_first_chunk(self) -> None:
        run = self.state
        if run.quiet:
            return
        request_id = run.new_id("oai")
        body = {"q": _prompt(5), "max_tokens": run.options.answer_tokens, "stream": True}
        deadline = gevent.Timeout(run.options.early_quit_sec)
        run.quitters_in_flight += 1
        started = time.perf_counter()
        deadline.start()
        try:
            response = self.post(body, request_id, "openai early quit")
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            # As EarlyQuitterUser: left before streaming, or dropped by the proxy before the
            # ingress saw it, or refused with a 429 still on its way.
            refusals = (rejected(code) for code in run.refusal_codes("too_many_requests"))
            self.record(request_id, BEFORE_STREAMING, ABSENT, *refusals)
            self.environment.events.request.fire(
                request_type="POST", name="openai early quit",
                response_time=(time.perf_counter() - started) * 1000, response_length=0,
                exception=None, context={},
            )  # fmt: skip
            return
        finally:
            deadline.close()
            run.quitters_in_flight -= 1
        with response:
            if response.status_code != 200:
                return self.refused(response, request_id)
            response.close()
            self.record(request_id, WHILE_STREAMING, SUCCESS, BEFORE_STREAMING)
            run.warnings.append(f"{request_id}: first chunk arrived before --early-quit-sec")
            response.success()
