"""events.aio.async_wait_event: the wait the long-running loops of the PostgreSQL store and the leader use."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from events.aio import async_wait_event

Wait = Callable[[asyncio.Event, float], Awaitable[object]]


async def _wait_for(event: asyncio.Event, timeout: float) -> None:
    """What the loops did before: Python 3.11's wait_for drops a cancellation that comes as the event is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


async def _kept_cancellations(wait: Wait, trials: int = 50) -> int:
    """How many of `trials` loops (wait; work) end when cancelled in the loop iteration that sets the event."""
    ended = 0
    for _ in range(trials):
        event = asyncio.Event()

        async def loop(event: asyncio.Event) -> None:
            while True:
                await wait(event, 10.0)
                event.clear()
                await asyncio.sleep(0)

        task = asyncio.ensure_future(loop(event))
        for _ in range(3):
            await asyncio.sleep(0)
        event.set()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.2)
        if done:
            ended += 1
        else:
            task.cancel()  # a lost cancellation: stop the loop for good
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ended


async def test_a_loop_on_it_always_ends_when_cancelled_as_the_event_is_set() -> None:
    assert await _kept_cancellations(async_wait_event) == 50


@pytest.mark.skipif(
    not hasattr(asyncio, "timeout") or __import__("sys").version_info >= (3, 12), reason="the 3.11 wait_for race"
)
async def test_the_wait_for_it_replaces_loses_those_cancellations_on_311() -> None:
    # the reason for the helper, shown on this interpreter: the same loop on wait_for keeps running
    assert await _kept_cancellations(_wait_for, trials=10) < 10


async def test_it_returns_whether_the_event_is_set() -> None:
    event = asyncio.Event()
    assert await async_wait_event(event, 0.01) is False
    event.set()
    assert await async_wait_event(event, 0.01) is True
    event.clear()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await async_wait_event(event, 5.0) is True


async def test_a_cancellation_while_waiting_propagates() -> None:
    task = asyncio.ensure_future(async_wait_event(asyncio.Event(), 10.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
