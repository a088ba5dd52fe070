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
import os
import statistics
import time
from dataclasses import dataclass, field

from locust import between, constant, task

from loadtest.accounting import SUCCESS, UNKNOWN_ERROR
from loadtest.client import REQUEST_ID_HEADER, AccountedUser, prompt
from loadtest.openai_user import STREAM_CUT, CompletionChunks
from loadtest.run_state import RUN

KEYS_ENV = "CHATSTREAM_API_KEYS"
FLOOD_PREFIX = "flood"


def keys_from_environment() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(flood keys, polite keys) as (key id, key) pairs."""
    pairs = []
    for line in os.environ.get(KEYS_ENV, "").splitlines():
        key_id, sep, key = line.strip().partition(":")
        if sep and not key_id.startswith("#"):
            pairs.append((key_id.strip(), key.strip()))
    flood = [p for p in pairs if p[0].startswith(FLOOD_PREFIX)]
    return flood, [p for p in pairs if not p[0].startswith(FLOOD_PREFIX)]


@dataclass
class Tally:
    admitted: int = 0
    refused: int = 0
    first_chunk_s: list[float] = field(default_factory=list)


TALLIES: dict[str, Tally] = {}
_next_polite = itertools.count()


class TenantUser(AccountedUser):
    abstract = True
    behaviour = "tenant"
    key_id = ""

    def pick_key(self) -> tuple[str, str] | None:
        raise NotImplementedError

    def on_start(self) -> None:
        picked = self.pick_key()
        if picked is None:
            raise RuntimeError(f"{type(self).__name__}: no such key in {KEYS_ENV}")
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
            try:
                for index, _ in enumerate(CompletionChunks(response)):
                    if index == 0:
                        tally.first_chunk_s.append(time.monotonic() - started)
            except STREAM_CUT as exc:
                ok = RUN.errors_expected
                RUN.record(
                    request_id, self.behaviour, UNKNOWN_ERROR, violation="" if ok else f"cut: {exc}"
                )
                response.failure(f"stream cut: {exc}")
                return
            RUN.record(request_id, self.behaviour, SUCCESS)
            response.success()


class FloodUser(TenantUser):
    """Sends again at once: one of many users of the flooding key."""

    behaviour = "flood"
    weight = 0  # set from --flood-weight at init
    wait_time = constant(0)

    def pick_key(self) -> tuple[str, str] | None:
        flood, _ = keys_from_environment()
        return flood[0] if flood else None


class PoliteUser(TenantUser):
    """One request at a time, a pause between; each polite user has a key of its own (round
    robin over the polite keys)."""

    behaviour = "polite"
    weight = 0  # set from --polite-weight at init
    wait_time = between(0.3, 0.8)

    def pick_key(self) -> tuple[str, str] | None:
        _, polite = keys_from_environment()
        return polite[next(_next_polite) % len(polite)] if polite else None


def tenant_report() -> tuple[str, bool]:
    """The per-key table, and False if a polite key was locked out (nothing admitted)."""
    if not TALLIES:
        return "", True
    lines = [f"{'key id':<12} {'admitted':>8} {'refused':>8} {'first chunk p50':>16} {'p95':>8}"]
    locked_out = []
    for key_id, tally in sorted(TALLIES.items()):
        times = sorted(tally.first_chunk_s)
        p50 = statistics.median(times) if times else float("nan")
        p95 = times[int(0.95 * (len(times) - 1))] if times else float("nan")
        lines.append(
            f"{key_id:<12} {tally.admitted:>8} {tally.refused:>8} {p50:>15.2f}s {p95:>7.2f}s"
        )
        if not key_id.startswith(FLOOD_PREFIX) and tally.admitted == 0:
            locked_out.append(key_id)
    if locked_out:
        lines.append(f"LOCKED OUT (no request admitted): {', '.join(locked_out)}")
    return "\n".join(lines), not locked_out
