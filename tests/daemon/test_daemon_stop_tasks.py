"""moldd.daemon.async_cancel_and_wait: a stop ends the daemon's tasks even when one loses a cancellation, and is
never held up for ever by one that will not end."""

from __future__ import annotations

import asyncio

from moldd.daemon import async_cancel_and_wait


async def test_a_task_that_lost_its_cancellation_is_cancelled_again() -> None:
    lost = []

    async def loses_one() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append(1)  # as wait_for on Python 3.11 may: the loop goes on

    async def plain() -> None:
        await asyncio.sleep(10)

    tasks = [asyncio.ensure_future(loses_one()), asyncio.ensure_future(plain())]
    await asyncio.sleep(0)
    await asyncio.wait_for(async_cancel_and_wait(tasks, timeout_s=5.0), 3.0)
    assert lost == [1] and all(t.cancelled() for t in tasks)


async def test_a_task_that_never_ends_does_not_hold_the_stop() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.ensure_future(stubborn())
    task.set_name("stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(async_cancel_and_wait([task], timeout_s=0.3), 3.0)
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait([task])


async def test_a_failed_task_is_retrieved_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await async_cancel_and_wait([task])
    assert isinstance(task.exception(), RuntimeError)
