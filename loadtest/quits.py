"""Closing early, as the quitters of both APIs do, and what such a close may end as.

A close reaches the server some time after the client sent it. Until then the server goes on:
it may take a slot, send chunks, even send the whole answer, and then it rightly records a
later outcome than the one the client saw (`client_disconnected_before_streaming` <
`client_disconnected_while_streaming` < `success`). The client cannot know, so a close accepts
what the client saw (the likeliest, first) and every later outcome; the server's per-request
ledger says which it was, and the table counts such requests as ambiguous. A client that already
read the end of the answer before it closed (a `finish_reason` chunk, but not yet `[DONE]`)
accepts `success` or, if its close beat the server's last write, a disconnect while streaming.

`--strict-quits` is for a service set up so that no close can race the answer (a first token
later than `--early-quit-sec`, answers far longer than the chunks a quitter reads, as
run_profile's services are): a close then accepts only what the client saw.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent

from loadtest.accounting import (
    ABSENT,
    BEFORE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    WHILE_STREAMING,
    rejected,
)
from loadtest.run_state import RUN

PROGRESS = (BEFORE_STREAMING, WHILE_STREAMING, SUCCESS)  # how far a request can get


def close_accepts(seen: str, end_seen: bool = False) -> tuple[str, ...]:
    """The outcomes a close after seeing `seen` can end as, the likeliest first."""
    if end_seen:
        return (SUCCESS, WHILE_STREAMING)
    if RUN.options.strict_quits:
        return (seen,)
    return PROGRESS[PROGRESS.index(seen) :]


@contextlib.contextmanager
def quitting() -> Iterator[None]:
    """Counts the quitters in flight (the replica fault waits until none is)."""
    RUN.quitters_in_flight += 1
    try:
        yield
    finally:
        RUN.quitters_in_flight -= 1


def quit_early(user: Any, request_id: str, name: str, send: Callable[[str, str], Any]) -> None:
    """Send (`send(request_id, name)` posts it) and close `--early-quit-sec` later, before the
    first chunk can exist.

    urllib3 closes the connection when a request is interrupted: the service sees the client
    leave while its request waits for a slot or its first token. Two more endings are
    consistent with having seen nothing: the proxy dropped the request before the ingress got
    it (no entry), or the service refused it with a 429 that was still on its way.
    """
    deadline = gevent.Timeout(RUN.options.early_quit_sec)
    started = time.perf_counter()
    with quitting():
        deadline.start()
        try:
            response = send(request_id, name)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            first, *later = close_accepts(BEFORE_STREAMING)
            refusals = (rejected(code) for code in RUN.refusal_codes("too_many_requests"))
            RUN.record(request_id, user.behaviour, first, ABSENT, *refusals, *later)
            user.environment.events.request.fire(
                request_type="POST",
                name=name,
                response_time=(time.perf_counter() - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
            return
        finally:
            deadline.close()
    with response:
        if response.status_code != 200:
            user.refused(response, request_id, "too_many_requests")
            return
        # A slot was taken before our deadline (the service is not saturated, or its first
        # token comes sooner than --early-quit-sec): a chunk, or all of them, may be on the way.
        response.close()
        RUN.record(request_id, user.behaviour, WHILE_STREAMING, SUCCESS, BEFORE_STREAMING)
        RUN.warnings.append(f"{request_id}: the answer began before --early-quit-sec")
        response.success()


def read_then_close(
    user: Any,
    response: Any,
    request_id: str,
    pieces: Iterable[Any],
    cut: tuple[type[BaseException], ...],
    end_seen: Callable[[], bool] = lambda: False,
) -> None:
    """Read 1-3 `pieces` of a 200 answer, then close. An answer that ends sooner was read to
    its end (success); a read that fails with one of `cut` is a cut stream."""
    want, got = random.randint(1, 3), 0
    try:
        for _ in pieces:
            got += 1
            if got >= want:
                break
        else:  # the whole answer was shorter: read to its end, no close
            RUN.record(request_id, user.behaviour, SUCCESS)
            response.success()
            return
    except cut as exc:
        ok = RUN.errors_expected
        violation = "" if ok else f"stream cut after {got} chunks: {exc}"
        RUN.record(request_id, user.behaviour, UNKNOWN_ERROR, violation=violation)
        response.failure(f"stream cut after {got} chunks: {type(exc).__name__}")
        return
    response.close()  # closes the socket: the service sees the client leave
    RUN.record(request_id, user.behaviour, *close_accepts(WHILE_STREAMING, end_seen()))
    response.success()
