"""What every user of the load test shares: the request id header, prompts, and the tally of a
refused request (429, 4xx, 503, a proxy error or no answer at all)."""

from __future__ import annotations

import random
import time
from typing import Any

import requests
from locust import HttpUser

from loadtest.accounting import ABSENT, BEFORE_STREAMING, UNKNOWN_ERROR, rejected
from loadtest.run_state import OVER_FAIR_SHARE, RUN, STORE_UNAVAILABLE

REQUEST_ID_HEADER = "X-ChatStream-Request-Id"
WORDS = ("river", "cloud", "lantern", "harbor", "meadow", "signal", "copper", "orbit", "garden")


def prompt(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


class AccountedUser(HttpUser):
    """A user whose every request carries a fresh request id and ends as one client record."""

    abstract = True
    behaviour = "?"

    def error_code(self, response: requests.Response) -> str:
        """The server's reason for a non-200 answer (ChatStream's `{"error": code}`)."""
        try:
            return str(response.json().get("error", f"http_{response.status_code}"))
        except (ValueError, AttributeError):
            return f"http_{response.status_code}"

    def refused(self, response: Any, request_id: str, *allowed: str) -> None:
        """Record a non-200 answer; `allowed` are the error codes this behaviour expects."""
        allowed = RUN.refusal_codes(*allowed)
        if response.status_code == 0:  # no HTTP answer: refused, cut, or we timed out waiting
            RUN.record(
                request_id,
                self.behaviour,
                ABSENT,
                UNKNOWN_ERROR,
                BEFORE_STREAMING,
                violation="" if RUN.errors_expected else f"no answer: {response.error}",
            )
            response.failure(f"no answer: {response.error}")
            return
        code = self.error_code(response)
        if response.status_code == 503 and code == STORE_UNAVAILABLE:
            # Refused before admission: no slot, no callback. The server records the refusal
            # only if the store came back in time to take it.
            violation = "" if code in allowed else "503 store_unavailable"
            RUN.record(request_id, self.behaviour, rejected(code), ABSENT, violation=violation)
            response.failure("503 store_unavailable (expected while the store is down)")
            return
        if response.status_code == 500 and code == UNKNOWN_ERROR:
            # admitted, failed before its first chunk
            ok = RUN.errors_expected or UNKNOWN_ERROR in allowed
            RUN.record(
                request_id, self.behaviour, UNKNOWN_ERROR, violation="" if ok else "HTTP 500"
            )
            response.failure("500 unknown_error_occurred")
            return
        if response.status_code >= 500:  # not ours: a proxy error; the ingress never saw it
            RUN.record(
                request_id,
                self.behaviour,
                ABSENT,
                violation="" if RUN.errors_expected else f"HTTP {response.status_code}",
            )
            response.failure(f"HTTP {response.status_code}")
            return
        # A refusal while the store was down may not have been recorded by the server.
        started_at = response.request_meta.get("start_time", time.time())
        unrecorded = (ABSENT,) if RUN.overlaps_store_fault(started_at) else ()
        violation = "" if code in allowed else f"unexpected HTTP {response.status_code} {code}"
        RUN.record(request_id, self.behaviour, rejected(code), *unrecorded, violation=violation)
        if code in ("too_many_requests", OVER_FAIR_SHARE):
            response.failure(f"429 {code} (expected while saturated)")
        elif violation:
            response.failure(violation)
        else:
            response.success()
