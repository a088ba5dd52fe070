"""The users of `POST /chat_stream`, one class per behaviour, and the outcome each implies:

- ChatUser: multi-turn conversations, reads every answer to the end -> success
- EarlyQuitterUser: closes before the first chunk (queued for a slot) -> ..._before_streaming
- MidStreamQuitterUser: reads 1-3 chunks of a long answer, then closes -> ..._while_streaming
- BadInputUser: malformed JSON, missing/empty/oversized input, bad params -> 4xx, not admitted
- FailingPromptUser (opt-in): the mock engine's fail marker -> unknown_error_occurred

A quitter's close may race the answer; what it then accepts is in `loadtest/quits.py`.
"""

from __future__ import annotations

import json
import random
import time
from functools import partial
from typing import Any

import requests
from locust import between, task

from loadtest.accounting import SUCCESS, UNKNOWN_ERROR, WHILE_STREAMING
from loadtest.client import REQUEST_ID_HEADER, AccountedUser, prompt
from loadtest.options import Options
from loadtest.quits import quit_early, quitting, read_then_close
from loadtest.run_state import RUN


class ChatStreamUser(AccountedUser):
    abstract = True

    def post_chat(self, body: Any, request_id: str, name: str) -> Any:
        """POST /chat_stream, streamed, with Locust's catch_response context manager."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            "/chat_stream",
            data=data,
            headers={REQUEST_ID_HEADER: request_id, "Content-Type": "application/json"},
            stream=True,
            catch_response=True,
            name=name,
            timeout=(5.0, RUN.options.request_timeout),
        )

    def quitter_turn(self, kind: str, words: int, tokens: int) -> tuple[str, dict] | None:
        """A quitter's request id and body; none while the fault injector works.

        Each in a new session: the server releases a session's turn once it has seen the client
        leave, which on a loaded machine can come after this client's next request (then
        rightly a 409 turn_in_progress); and a growing history would shrink the room left for
        the answer in the context (the service clamps max_new_tokens: a short answer).
        """
        if RUN.quiet:
            return None
        self.client.cookies.clear()
        return RUN.new_id(kind), {"user_input": prompt(words), "max_new_tokens": tokens}

    def read_to_end(self, response: Any, request_id: str, expect_error: bool = False) -> bool:
        """Read a 200 stream to its end and record success, or an engine error if it was cut
        (then nothing was saved: returns False)."""
        chunks = size = 0
        started = time.perf_counter()
        try:
            for chunk in response.iter_content(chunk_size=None):
                chunks += 1
                size += len(chunk)
        except requests.RequestException as exc:
            ok = expect_error or RUN.errors_expected
            RUN.record(
                request_id,
                self.behaviour,
                UNKNOWN_ERROR,
                violation="" if ok else f"stream cut after {chunks} chunks",
            )
            if expect_error:
                response.success()
            else:
                response.failure(f"stream cut after {chunks} chunks: {type(exc).__name__}")
            return False
        finally:
            response.request_meta["response_time"] += (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = size
        if expect_error:
            RUN.record(
                request_id, self.behaviour, SUCCESS, violation="expected an engine error, got 200"
            )
            response.failure("expected an engine error")
        else:
            RUN.record(request_id, self.behaviour, SUCCESS)
            response.success()
        return True


class ChatUser(ChatStreamUser):
    """Holds multi-turn conversations and reads every answer to the end."""

    behaviour = "chatter"
    weight = 6  # set from --chatter-weight at init
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.turns = 0
        self.has_answer = False

    def turn(self, body: dict[str, Any], name: str) -> None:
        request_id = RUN.new_id("chat")
        with self.post_chat(body, request_id, name) as response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests")
                return
            if self.read_to_end(response, request_id):  # a cut answer is not in the history
                self.turns += 1
                self.has_answer = True

    @task(6)
    def chat(self) -> None:
        if self.turns >= RUN.options.turns:
            self.client.post("/clear_context", name="/clear_context")
            self.turns, self.has_answer = 0, False
        body = {
            "user_input": prompt(random.randint(3, 12)),
            "max_new_tokens": RUN.options.answer_tokens,
        }
        self.turn(body, "chat turn")

    @task(1)
    def regenerate(self) -> None:
        if not self.has_answer:
            return self.chat()
        self.turn({"regenerate": True, "max_new_tokens": RUN.options.answer_tokens}, "regenerate")


class EarlyQuitterUser(ChatStreamUser):
    """Sends a turn and closes the connection before the first chunk can exist."""

    behaviour = "early quitter"
    weight = 3  # set from --early-quitter-weight at init
    wait_time = between(0.2, 1.0)

    @task
    def quit_before_first_chunk(self) -> None:
        if turn := self.quitter_turn("early", 5, RUN.options.answer_tokens):
            quit_early(self, turn[0], "early quit", partial(self.post_chat, turn[1]))


class MidStreamQuitterUser(ChatStreamUser):
    """Asks for a long answer, reads 1-3 chunks, closes the connection."""

    behaviour = "mid-stream quitter"
    weight = 3  # set from --mid-stream-quitter-weight at init
    wait_time = between(0.5, 1.5)

    @task
    def quit_while_streaming(self) -> None:
        tokens = RUN.options.long_answer_tokens
        if not (turn := self.quitter_turn("mid", min(tokens, 300), tokens)):
            return
        request_id, body = turn
        with quitting(), self.post_chat(body, request_id, "quit mid-stream") as response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests")
                return
            chunks = (chunk for chunk in response.iter_content(chunk_size=None) if chunk)
            read_then_close(self, response, request_id, chunks, (requests.RequestException,))


def bad_inputs(options: Options) -> list[tuple[str, Any, str]]:
    """(case, body, expected error code). Each is refused before admission."""
    return [
        ("malformed json", b'{"user_input": "hello"', "invalid_json"),
        ("not an object", b'["hello"]', "invalid_json"),
        ("missing user_input", {"max_new_tokens": 4}, "invalid_request"),
        ("empty user_input", {"user_input": "   "}, "invalid_request"),
        ("user_input not a string", {"user_input": 42}, "invalid_request"),
        ("oversized user_input", {"user_input": "x" * 40_000}, "invalid_request"),
        ("temperature out of range", {"user_input": "hi", "temperature": 5.0}, "invalid_request"),
        ("max_new_tokens 0", {"user_input": "hi", "max_new_tokens": 0}, "invalid_request"),
        ("top_p 0", {"user_input": "hi", "top_p": 0.0}, "invalid_request"),
        ("top_k not an int", {"user_input": "hi", "top_k": "many"}, "invalid_request"),
        ("regenerate without history", {"regenerate": True}, "nothing_to_regenerate"),
        ("tiny temperature", {"user_input": "hi", "temperature": 1e-300}, "invalid_request"),
        ("deeply nested json", b"[" * 5_000 + b"]" * 5_000, "invalid_json"),
        ("body over the limit", b'{"user_input": "' + b"x" * 1_100_000 + b'"}', "body_too_large"),
        (
            "prompt over the context",
            {"user_input": " ".join(["word"] * options.too_long_words)},
            "prompt_too_long",
        ),
    ]


class BadInputUser(ChatStreamUser):
    """Sends requests the service must refuse with a 4xx before admission (it never chats, so
    its session has nothing to regenerate)."""

    behaviour = "bad input"
    weight = 2  # set from --bad-input-weight at init
    wait_time = between(0.5, 1.5)

    @task
    def send_bad_input(self) -> None:
        case, body, code = random.choice(bad_inputs(RUN.options))
        request_id = RUN.new_id("bad")
        with self.post_chat(body, request_id, f"bad input: {case}") as response:
            if response.status_code == 200:
                response.close()
                RUN.record(
                    request_id,
                    self.behaviour,
                    SUCCESS,
                    WHILE_STREAMING,
                    violation=f"{case}: answered 200 instead of {code}",
                )
                response.failure("bad input was admitted")
                return
            self.refused(response, request_id, code)


class FailingPromptUser(ChatStreamUser):
    """Sends a prompt containing the mock engine's fail marker: the engine raises after its
    first token, so the stream is cut and the outcome is unknown_error_occurred."""

    behaviour = "failing prompt"
    weight = 1  # set from --failing-prompt-weight at init (0 unless --fail-marker is given)
    wait_time = between(1.0, 3.0)

    @task
    def provoke_engine_error(self) -> None:
        request_id = RUN.new_id("fail")
        body = {"user_input": f"please {RUN.options.fail_marker} now", "max_new_tokens": 8}
        with self.post_chat(body, request_id, "engine failure") as response:
            if response.status_code != 200:
                self.refused(response, request_id, "too_many_requests", UNKNOWN_ERROR)
                return
            self.read_to_end(response, request_id, expect_error=True)
