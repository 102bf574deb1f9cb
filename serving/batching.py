"""Micro-batching: concurrent single-record requests share one model call.

A model call has a fixed cost whatever the number of rows, so under concurrency the
server gathers the requests that arrive within a short window (or until a size cap) and
scores them in one call on a worker thread, off the event loop. Requests that arrive
while a call runs wait for the next one, so the batches grow with the load on their own.

Each waiter gets its own result, or the exception of the call that scored it; a waiter
that gave up (its client went away) is skipped if its call has not started yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Gathers items submitted concurrently and scores them together.

    Args:
        score: Scores a list of items and returns their results in the same order; runs
            on a worker thread, one call at a time.
        max_items: Most items in one call.
        window_seconds: How long the first item of an idle batcher waits for others to
            join it; 0 scores at once (only items that arrived during the previous call
            are then batched).
    """

    def __init__(
        self, score: Callable[[list[Item]], Sequence[Result]], *, max_items: int, window_seconds: float
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if window_seconds < 0:
            raise ValueError(f"window_seconds must not be negative, got {window_seconds}")
        self._score = score
        self.max_items = max_items
        self.window_seconds = window_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.calls = 0  # model calls made, for tests and diagnostics
        self.items = 0  # items scored

    async def submit(self, item: Item) -> Result:
        """Score ``item`` in the next call and return its result.

        Raises:
            Exception: Whatever the scoring call raised, for every item of that call.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._attach(loop)
        assert self._wakeup is not None
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name="micro-batcher")
        self._wakeup.set()
        return await future

    async def aclose(self) -> None:
        """Stop the worker; items still waiting get a ``RuntimeError`` (none do after a graceful shutdown)."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._fail(self._take(len(self._pending)), RuntimeError("the server is shutting down"))

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (an app started again, e.g. by a second test client): nothing of the
        # old one can be awaited from this one, and its waiters are gone with it.
        self._loop = loop
        self._pending = []
        self._wakeup = asyncio.Event()
        self._worker = None

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.window_seconds > 0 and len(self._pending) < self.max_items:
                    await asyncio.sleep(self.window_seconds)
            batch = [entry for entry in self._take(self.max_items) if not entry[1].done()]
            if batch:
                await self._call(batch)

    def _take(self, count: int) -> list[tuple[Item, asyncio.Future[Result]]]:
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    async def _call(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await run_in_threadpool(self._score, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"scoring returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            self._fail(batch, RuntimeError("the server is shutting down"))
            raise
        except Exception as err:  # every waiter of this call gets the error; the worker lives on
            self._fail(batch, err)
            return
        self.calls += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[Item, asyncio.Future[Result]]], error: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
