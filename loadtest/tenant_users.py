"""Tenants under saturation: a flooding API key and polite ones, on /v1/chat/completions.

The keys are the service's own (`CHATSTREAM_API_KEYS`, lines `key_id:key`, which run_profile
hands to the service and to Locust): ids starting with `flood` are flooders, the others polite.
FloodUser sends again the moment an answer ends (a short pause after a 429); PoliteUser sends
one request at a time with a pause between. Every request is accounted as any other. At test
stop, each polite key's admissions, refusals and time to first chunk are reported; a polite key
that got no request admitted was locked out, and the run fails.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator

from locust import between, constant, task

from loadtest.client import REQUEST_ID_HEADER, prompt
from loadtest.openai_user import STREAM_CUT, CompletionChunks, OpenAIUser
from loadtest.run_state import RUN
from loadtest.stream_user import StreamReader
from loadtest.tenant_tally import TALLIES, Tally, keys_from_environment

_next_polite = itertools.count()


def timing_first(chunks: Iterable[str], started: float, tally: Tally) -> Iterator[str]:
    """The chunks, noting the time to the first one in `tally`."""
    for index, chunk in enumerate(chunks):
        if index == 0:
            tally.first_chunk_s.append(time.monotonic() - started)
        yield chunk


class TenantUser(StreamReader):
    abstract = True
    behaviour = "tenant"
    key_id = ""
    error_code = OpenAIUser.error_code  # OpenAI's error object
    stream_cut = STREAM_CUT

    def pick_key(self) -> tuple[str, str] | None:
        raise NotImplementedError

    def on_start(self) -> None:
        picked = self.pick_key()
        if picked is None:
            raise RuntimeError(f"{type(self).__name__}: no such key in CHATSTREAM_API_KEYS")
        self.key_id, key = picked
        self.auth = {"Authorization": f"Bearer {key}"}
        TALLIES.setdefault(self.key_id, Tally())

    @task
    def ask(self) -> None:
        request_id = RUN.new_id(self.key_id)
        tally = TALLIES[self.key_id]
        started = time.monotonic()
        with self.client.post(
            "/v1/chat/completions",
            json={"model": "mock", "messages": [{"role": "user", "content": prompt(4)}],
                  "max_tokens": RUN.options.answer_tokens, "stream": True},
            headers={REQUEST_ID_HEADER: request_id, **self.auth},
            stream=True,
            catch_response=True,
            name=f"{self.behaviour} stream",
            timeout=(5.0, RUN.options.request_timeout),
        ) as response:  # fmt: skip
            if response.status_code != 200:
                tally.refused += 1
                self.refused(response, request_id, "too_many_requests")
                time.sleep(0.05)  # a flooder's pause: keeps the load generator's CPU sane
                return
            tally.admitted += 1
            chunks = timing_first(CompletionChunks(response), started, tally)
            self.read_to_end(response, request_id, chunks)


class FloodUser(TenantUser):
    """Sends again at once: one of many users of the flooding key."""

    behaviour = "flood"
    weight = 1  # set from --flood-weight at init (a class of weight 0 Locust drops early)
    wait_time = constant(0)

    def pick_key(self) -> tuple[str, str] | None:
        flood, _ = keys_from_environment()
        return flood[0] if flood else None


class PoliteUser(TenantUser):
    """One request at a time, a pause between; each polite user has a key of its own (round
    robin over the polite keys)."""

    behaviour = "polite"
    weight = 1  # set from --polite-weight at init
    wait_time = between(0.3, 0.8)

    def pick_key(self) -> tuple[str, str] | None:
        _, polite = keys_from_environment()
        return polite[next(_next_polite) % len(polite)] if polite else None
