"""The admission's finish and the bookkeeping without Ray Serve: the path that left a phantom
`queued: 1` on /load, and the callback rules (off the event loop, bounded, once)."""

from __future__ import annotations

import asyncio
import threading
import time

from serve_app.access import Access, Caller
from serve_app.admission import Admission
from serve_app.background import Background
from serve_app.bookkeeping import Bookkeeping
from serve_app.config import ChatStreamConfig
from serve_app.exchange import Exchange, Turn
from serve_app.liveness import LoadBoard
from serve_app.outcomes import Outcome
from serve_app.session_state import SessionLimits, begin_turn
from serve_app.sessions import SessionView
from serve_app.stores import StoreSettings
from serve_app.stores.memory import MemoryStore


class _Prompt:
    messages: list = []


class ModelStream:
    """Stands in for the model deployment's response generator: only `cancel` is used."""

    def __init__(self, cancel_raises: BaseException | None = None) -> None:
        self.cancelled = False
        self.cancel_raises = cancel_raises

    def cancel(self) -> None:
        self.cancelled = True
        if self.cancel_raises is not None:
            raise self.cancel_raises


class _Model:
    """Stands in for the model's DeploymentHandle (never called in these tests)."""

    def options(self, **_):
        return self


class Harness:
    """The admission lifecycle of one ingress replica, on a memory store, without Serve."""

    def __init__(self, **options) -> None:
        self.store = MemoryStore(StoreSettings(namespace="t"))
        self.background = Background()
        access = Access(ChatStreamConfig(engine="mock"), environ={})
        self.bookkeeping = Bookkeeping(
            self.store, SessionLimits(), self.background, access, **options
        )
        self.board = LoadBoard(self.store, "replica-1", self.background)
        self.admission = Admission(
            _Model(), self.store, self.bookkeeping, self.board,
            replica_id="replica-1", retry_after_sec=1,
        )  # fmt: skip

    async def drain(self) -> None:
        await self.background.drain(5, forever=set())


async def exchange_for(harness: Harness, callback=None, session_id: str = "s1") -> Exchange:
    record = await harness.store.change_session(session_id, begin_turn("t1", time.time(), 60))
    return Exchange(
        request=object(),
        caller=Caller("r1"),
        request_id="r1",
        record_id="rec1",
        message_id="m1",
        model_stream=ModelStream(),
        callback=callback,
        session=SessionView(session_id, record, _Prompt(), stored=True),
        turn=Turn("t1", 0, {"role": "user", "content": "hi"}),
    )


async def test_a_finish_from_another_thread_is_applied_on_the_event_loop():
    """The garbage collector may finish a never-sent response in any thread. Done in place,
    its load-board update raced the event loop's (a read-modify-write of the counters) and its
    report could overtake a newer one: /load kept a phantom waiting request."""
    harness = Harness()
    store = harness.store
    exchanges = [await exchange_for(harness, session_id=f"s{i}") for i in range(50)]
    board = harness.board
    loop_thread, threads_seen = threading.get_ident(), set()
    change = board.change

    def recording_change(**figures):
        threads_seen.add(threading.get_ident())
        change(**figures)

    board.change = recording_change
    for _ in exchanges:
        board.change(queued=1)
    threads = [
        threading.Thread(target=harness.admission.finish, args=(e, asyncio.CancelledError()))
        for e in exchanges
    ]
    for thread in threads:
        thread.start()
    for _ in range(200):  # meanwhile the loop keeps changing the board
        board.change(queued=1)
        await asyncio.sleep(0)
        board.change(queued=-1)
    for thread in threads:
        thread.join()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if all(e.finished for e in exchanges) and (await store.load())["queued"] == 0:
            break
    assert threads_seen == {loop_thread}  # never changed in place from another thread
    assert board.queued == 0 and board.ongoing == 0
    assert await store.load() == {"ongoing": 0, "queued": 0}
    assert all(e.model_stream.cancelled for e in exchanges)


async def test_a_slow_sync_callback_runs_off_the_event_loop_and_a_stuck_one_times_out():
    started = threading.Event()

    def slow_callback(request, message):
        started.set()
        time.sleep(0.5)

    harness = Harness(callback_timeout_sec=0.2)
    store = harness.store
    exchange = await exchange_for(harness, slow_callback)
    ticks = 0
    task = asyncio.ensure_future(harness.bookkeeping.complete(exchange, Outcome.SUCCESS))
    while not task.done():  # the loop stays free while the callback sleeps
        ticks += 1
        await asyncio.sleep(0.01)
    assert started.is_set() and ticks >= 10
    # Timed out, yet it counted as the one call: the outcome is recorded once.
    assert (await store.outcome_totals())["outcomes"]["success"] == 1
    assert (await store.load_session("s1"))["turn"] is None


async def test_pending_bookkeeping_is_awaited_on_shutdown_up_to_the_deadline():
    done = []

    async def callback(request, message):
        await asyncio.sleep(0.2)
        done.append(message)

    harness = Harness()
    exchange = await exchange_for(harness, callback)
    exchange.completed = True
    harness.admission.finish(exchange, None)
    await harness.drain()  # what the ingress does when Serve shuts it down
    assert done == ["success"]


async def test_a_cancel_that_raises_still_frees_the_board_and_releases_the_turn():
    """Ray's `DeploymentResponseGenerator.cancel()` re-raises how the replica assignment ended.
    Raised in the middle of `finish`, it skipped the load board and the bookkeeping: the long
    load-test profile ended with `queued: 8` on /load and sessions stuck in 409."""
    harness = Harness()
    store = harness.store
    exchange = await exchange_for(harness)
    exchange.model_stream = ModelStream(cancel_raises=RuntimeError("assignment failed"))
    harness.board.change(queued=1)
    harness.admission.finish(exchange, asyncio.CancelledError())
    await harness.drain()
    assert harness.board.queued == 0
    assert (await store.outcome_totals())["outcomes"]["client_disconnected_before_streaming"] == 1
    assert (await store.load_session("s1"))["turn"] is None  # the next turn is not refused
