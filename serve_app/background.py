"""Background tasks of one ingress replica: work that a request's cancellation cannot reach
(bookkeeping after an outcome, load reports, the heartbeat), all on the replica's event loop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger("ray.serve")


class Background:
    """Spawns tasks in a fresh context on the loop it was made on, and keeps them referenced
    until they end."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks: set[asyncio.Task] = set()

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def call_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` on the loop's thread (safe from any thread)."""
        self._loop.call_soon_threadsafe(function, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        # A fresh context: the request's context (and its cancellation) is not inherited.
        task = self._loop.create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def run_in_executor(self, executor: Any, function: Callable[..., Any], *args: Any) -> Any:
        return self._loop.run_in_executor(executor, function, *args)

    async def drain(self, timeout_sec: float, *, forever: set[asyncio.Task]) -> None:
        """On shutdown: wait (bounded) for the tasks still under way, except `forever` ones
        (loops such as the heartbeat), which are cancelled."""
        pending = [t for t in self._tasks if t not in forever]
        if pending:
            logger.info("waiting up to %s s for %d bookkeeping tasks", timeout_sec, len(pending))
            await asyncio.wait(pending, timeout=timeout_sec)
        for task in forever:
            task.cancel()
