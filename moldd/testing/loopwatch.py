"""Detect a blocked event loop: a ticker measures how late each of its wake-ups is."""

from __future__ import annotations

import asyncio
from types import TracebackType


class LoopWatch:
    """``async with LoopWatch() as watch: ...`` then ``assert watch.max_lag < limit``.

    A task sleeps ``interval`` seconds over and over and records how much later than asked it woke up;
    anything that holds the loop (a blocking call) shows up as lag.  The final lag is also measured on
    exit, so a block at the very end of the body is not missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._expected = 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self._record(loop.time())

    def _record(self, now: float) -> None:
        lag = now - self._expected
        if lag > self.max_lag:
            self.max_lag = lag
        self.ticks += 1

    async def __aenter__(self) -> LoopWatch:
        loop = asyncio.get_running_loop()
        self._expected = loop.time() + self.interval
        self._task = asyncio.create_task(self._run(), name="loopwatch")
        await asyncio.sleep(0)  # let the ticker take its first timestamp
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._record(asyncio.get_running_loop().time())
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
