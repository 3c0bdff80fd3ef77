"""LoopWatch notices a blocked loop (and only then)."""

from __future__ import annotations

import asyncio
import time

from moldd.testing.loopwatch import LoopWatch


async def test_loopwatch_detects_a_deliberately_blocked_loop() -> None:
    async with LoopWatch() as watch:
        await asyncio.sleep(0.05)
        time.sleep(0.3)
        await asyncio.sleep(0.02)
    assert watch.max_lag >= 0.25
    assert not watch.max_lag < 0.2


async def test_loopwatch_detects_a_block_at_the_very_end() -> None:
    async with LoopWatch() as watch:
        time.sleep(0.25)
    assert watch.max_lag >= 0.2


async def test_loopwatch_quiet_loop_has_small_lag() -> None:
    async with LoopWatch() as watch:
        await asyncio.sleep(0.2)
    assert watch.ticks > 10
    assert watch.max_lag < 0.2
