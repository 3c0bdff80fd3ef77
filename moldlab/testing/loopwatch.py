"""Detect a blocked event loop: a ticker measures how late each of its wake-ups is, minus the part of the delay
the machine's load explains.

A late wake-up has two causes: something held the loop (a blocking call, a long callback: what the tests
attack), or the kernel had no CPU for the process (a busy machine: what they must not depend on). Linux counts,
per thread, the time it spent runnable but waiting for a CPU (``/proc/thread-self/schedstat``, second field).
``max_blocked`` is the largest wake-up lag after subtracting that wait, of the loop's thread and (the GIL: a
preempted thread may hold it) of the process's other threads in the same tick: a blocking call still shows in
full (its thread sleeps or computes; it does not wait on a run queue), a preempted process does not.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import TracebackType

_TASKS = Path(f"/proc/{os.getpid()}/task")


def _runqueue_waits() -> dict[str, int]:
    """Nanoseconds each thread of this process has spent runnable but not running (empty without schedstat)."""
    out: dict[str, int] = {}
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(_TASKS / tid / "schedstat", "rb") as f:
                out[tid] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


class LoopWatch:
    """``async with LoopWatch() as watch: ...`` then ``assert watch.max_blocked < limit``.

    A task sleeps ``interval`` seconds over and over and records how much later than asked it woke up
    (``max_lag``: wall clock, grows with the machine's load) and that lag less the time the process's threads
    waited for a CPU meanwhile (``max_blocked``: what the loop's own work held it, independent of load). The
    final lag is also measured on exit, so a block at the very end of the body is not missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self.max_blocked = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._expected = 0.0
        self._waits: dict[str, int] = {}
        self.worst: dict[str, object] = {}  # the tick of max_blocked: lag and run-queue waits (for messages)
        self._loop_tid = ""

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._start_tick(loop.time())
            await asyncio.sleep(self.interval)
            self._record(loop.time())

    def _start_tick(self, now: float) -> None:
        self._expected = now + self.interval
        self._waits = _runqueue_waits()

    def _record(self, now: float) -> None:
        lag = now - self._expected
        if lag > self.max_lag:
            self.max_lag = lag
        if lag > 0:
            before = self._waits
            after = _runqueue_waits()
            waited = {t: (after[t] - before[t]) / 1e9 for t in after if t in before}
            own = waited.pop(self._loop_tid, 0.0)
            others = sum(waited.values())
            blocked = max(0.0, lag - own - others)
            if blocked > self.max_blocked:
                self.max_blocked = blocked
                self.worst = {"lag": lag, "loop_thread_waited": own, "other_threads_waited": waited}
        self.ticks += 1

    async def __aenter__(self) -> LoopWatch:
        loop = asyncio.get_running_loop()
        self._loop_tid = str(threading.get_native_id())
        self._start_tick(loop.time())
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
