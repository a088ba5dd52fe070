"""The Responses user of the load test: `POST /v1/responses` conversations kept on the server.

Each user keeps one response chain: it continues it with `previous_response_id` (streamed, or
a whole response object), and after `--turns` responses deletes it (`DELETE
/v1/responses/{id}`) and starts a new one. Its quitters use `store: false` answers, so a cut
answer never becomes the chain's latest. Every POST carries `X-ChatStream-Request-Id` and
joins the exact accounting like the other users.

Outcome each task implies:
- a streamed response read to `response.completed` (or `response.incomplete`: the token
  budget ended it), or a whole response object -> success
- 1-3 `response.output_text.delta` events of a long answer, then close ->
  client_disconnected_while_streaming (or success, if it had ended: see loadtest/quits.py)
- close before the first chunk can exist -> client_disconnected_before_streaming
- a 429 (queue full), or a 409 turn_in_progress (a slow store has not released the chain's
  last turn yet) -> a rejection; a 404 (the chain is gone) only in a run with a store fault
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from locust import between, task

from loadtest.accounting import SUCCESS
from loadtest.client import REQUEST_ID_HEADER, prompt
from loadtest.openai_user import OpenAIClient, StreamCut, sse_data
from loadtest.run_state import RUN
from loadtest.stream_user import Sender

ENDS = ("response.completed", "response.incomplete")


class ResponseDeltas:
    """The text of each `response.output_text.delta` event, as it arrives. Ends normally only
    after `response.completed` / `response.incomplete`; `response_id` is the response's."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.finished = False
        self.response_id: str | None = None

    def __iter__(self) -> Iterator[str]:
        for expected, data in enumerate(sse_data(self.response)):
            event = json.loads(data)
            if "error" in event or event.get("type") == "error":
                raise StreamCut(f"error event: {data[:200]}")
            if event.get("sequence_number") != expected:
                raise StreamCut(f"sequence_number {event.get('sequence_number')} != {expected}")
            kind = event.get("type")
            if kind == "response.created":
                self.response_id = event["response"]["id"]
            elif kind == "response.output_text.delta" and event["delta"]:
                yield event["delta"]
            elif kind in ENDS:
                self.finished = True
        if not self.finished:
            raise StreamCut("the stream ended without response.completed")


class ResponsesUser(OpenAIClient):
    """Talks to /v1/responses as an OpenAI SDK client keeping its conversation on the server."""

    behaviour = "responses"
    weight = 2  # set from --responses-weight at init
    wait_time = between(0.5, 1.5)
    id_prefix, label = "resp", "responses"
    latest: str | None = None  # the chain's latest response
    turns = 0

    def create(self, **fields: Any) -> Any:
        """The sender of a request: `create(...)(request_id, name)` posts it."""

        def send(request_id: str, name: str) -> Any:
            return self.client.post(
                "/v1/responses",
                json={"model": self.model, **fields},
                headers={REQUEST_ID_HEADER: request_id, **self.auth},
                stream=True,
                catch_response=True,
                name=name,
                timeout=(5.0, RUN.options.request_timeout),
            )

        return send

    def continued(self, response_id: str | None) -> None:
        """The chain has a new latest response; after `--turns` of them, delete it."""
        self.latest, self.turns = response_id, self.turns + 1
        if self.latest is not None and self.turns >= RUN.options.turns:
            self.client.delete(
                f"/v1/responses/{self.latest}", headers=self.auth, name="/v1/responses/{id}"
            )
            self.latest, self.turns = None, 0

    def refused_turn(self, response: Any, request_id: str) -> None:
        """A continuation refused: the chain starts again. A 404 (the chain is gone) is
        expected only where the run loses state on purpose (a store fault)."""
        lost = ("not_found",) if RUN.store_fault else ()
        self.refused(response, request_id, "too_many_requests", "turn_in_progress", *lost)
        if response.status_code == 404:
            self.latest, self.turns = None, 0

    def turn(self, stream: bool) -> Any:
        return self.create(
            input=prompt(random.randint(3, 8)),
            previous_response_id=self.latest,
            max_output_tokens=RUN.options.answer_tokens,
            stream=stream,
        )

    @task(3)
    def stream_turn(self) -> None:
        request_id = RUN.new_id("resp")
        with self.turn(stream=True)(request_id, "responses stream") as response:
            if response.status_code != 200:
                return self.refused_turn(response, request_id)
            deltas = ResponseDeltas(response)
            if not self.read_to_end(response, request_id, deltas):
                self.latest, self.turns = None, 0  # a cut answer may be the chain's latest now
                return
        self.continued(deltas.response_id)

    @task(1)
    def whole_turn(self) -> None:
        request_id = RUN.new_id("resp")
        with self.turn(stream=False)(request_id, "responses whole") as response:
            if response.status_code != 200:
                return self.refused_turn(response, request_id)
            try:
                answer = response.json()
                ok = answer["object"] == "response"
                ok = ok and answer["status"] in ("completed", "incomplete")
            except (ValueError, KeyError, TypeError) as exc:
                ok, answer = False, {"error": repr(exc)}
            violation = "" if ok else f"bad response: {answer}"
            RUN.record(request_id, self.behaviour, SUCCESS, violation=violation)
            if not ok:
                response.failure("bad response object")
                return
            response.success()
        self.continued(answer["id"])

    def streamed(self, words: int, tokens: int) -> Sender:
        return self.create(input=prompt(words), max_output_tokens=tokens, stream=True, store=False)

    def stream_events(self, response: Any) -> ResponseDeltas:
        return ResponseDeltas(response)
