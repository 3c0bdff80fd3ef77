"""LoopWatch notices a blocked loop (and only then), also on a machine busy with other processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from moldlab.testing.loopwatch import LoopWatch


def _burn_cpu(seconds: float) -> None:
    """Hold the loop with computation: ``seconds`` of this thread's CPU time, however long that takes."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    """Two busy processes per CPU beside the test: the machine is loaded, the loop's own code is not."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        time.sleep(0.2)  # let them reach the run queue
        yield
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()


async def test_loopwatch_detects_a_deliberately_blocked_loop() -> None:
    async with LoopWatch() as watch:
        await asyncio.sleep(0.05)
        time.sleep(0.3)
        await asyncio.sleep(0.02)
    assert watch.max_blocked >= 0.25 and watch.max_lag >= 0.25
    assert not watch.max_blocked < 0.2


async def test_loopwatch_detects_a_block_at_the_very_end() -> None:
    async with LoopWatch() as watch:
        time.sleep(0.25)
    assert watch.max_blocked >= 0.2


async def test_loopwatch_detects_computation_that_holds_the_loop() -> None:
    async with LoopWatch() as watch:
        await asyncio.sleep(0.02)
        _burn_cpu(0.3)
    assert watch.max_blocked >= 0.25


async def test_loopwatch_quiet_loop_has_small_lag() -> None:
    async with LoopWatch() as watch:
        await asyncio.sleep(0.2)
    assert watch.ticks > 3
    assert watch.max_blocked < 0.2


async def test_on_a_busy_machine_a_free_loop_is_not_blocked_and_a_blocked_one_is(cpu_hogs: None) -> None:
    async with LoopWatch() as free:
        for _ in range(20):
            await asyncio.sleep(0.05)  # the wall-clock lag may be large here: the CPUs are taken
    assert free.max_blocked < 0.2, (free.max_lag, free.max_blocked)
    async with LoopWatch() as blocked:
        await asyncio.sleep(0.02)
        time.sleep(0.6)
        await asyncio.sleep(0.02)
        _burn_cpu(0.6)
    # each block holds the loop 0.6 s; the measure subtracts CPU waits of the process's threads, which on a busy
    # machine may overlap a block a little: well above the 0.2 s that counts as blocked, with room for that
    assert blocked.max_blocked >= 0.4, (blocked.max_lag, blocked.max_blocked)
