"""What every streaming user of the load test does the same way, whatever the API: read a
stream to its end and account for it, and quit mid-stream or before the first chunk.

A subclass says how to send a streamed request (`streamed`) and how to read its events
(`stream_events`: an iterable with `finished`, true once the end of the answer was read), and
names its requests (`id_prefix`, `label`). Locust collects tasks only from User classes, so the
quitter is an abstract User to inherit from, not a plain mixin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from locust import task

from loadtest.accounting import SUCCESS, UNKNOWN_ERROR
from loadtest.client import AccountedUser
from loadtest.quits import quit_early, quitting, read_then_close
from loadtest.run_state import RUN

Sender = Callable[[str, str], Any]  # (request id, Locust name) -> the response context


class StreamReader(AccountedUser):
    """Reads a stream to its end and records it (no tasks)."""

    abstract = True
    stream_cut: tuple[type[BaseException], ...] = ()  # what a cut stream raises

    def read_to_end(self, response: Any, request_id: str, events: Iterable[Any]) -> bool:
        """`success` when the stream is read to its end (True); a cut is `unknown_error_occurred`
        and a violation unless the run expects errors (False)."""
        try:
            for _ in events:
                pass
        except self.stream_cut as exc:
            ok = RUN.errors_expected
            RUN.record(
                request_id, self.behaviour, UNKNOWN_ERROR, violation="" if ok else f"cut: {exc}"
            )
            response.failure(f"stream cut: {exc}")
            return False
        RUN.record(request_id, self.behaviour, SUCCESS)
        response.success()
        return True


class Quitter(StreamReader):
    """The two quitting tasks, for any streaming API."""

    abstract = True
    id_prefix = ""  # of the request ids (RUN.new_id)
    label = ""  # of the Locust request names

    def streamed(self, words: int, tokens: int) -> Sender:
        """The sender of a streamed request: a prompt of `words` words, `tokens` at most."""
        raise NotImplementedError

    def stream_events(self, response: Any) -> Any:
        """The answer's events, an iterable with `finished`."""
        raise NotImplementedError

    @task(2)
    def quit_mid_stream(self) -> None:
        if RUN.quiet:
            return
        request_id = RUN.new_id(self.id_prefix)
        # Long enough that the service cannot finish before the close reaches it (unless the
        # model stops sooner: then the close may race the end, see loadtest/quits.py).
        send = self.streamed(5, min(RUN.options.long_answer_tokens, 1024))
        with quitting(), send(request_id, f"{self.label} quit mid-stream") as response:
            if response.status_code != 200:
                return self.refused(response, request_id, "too_many_requests")
            events = self.stream_events(response)
            finished = lambda: events.finished  # noqa: E731 - read when the close happens
            read_then_close(self, response, request_id, events, self.stream_cut, finished)

    @task(1)
    def quit_before_first_chunk(self) -> None:
        if RUN.quiet:
            return
        request_id = RUN.new_id(self.id_prefix)
        send = self.streamed(5, RUN.options.answer_tokens)
        quit_early(self, request_id, f"{self.label} early quit", send)
