"""Small asyncio helpers the library's long-running loops share."""

from __future__ import annotations

import asyncio


async def async_wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; True if it is set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that returns normally, dropping the
    cancellation, when the caller is cancelled in the same loop iteration as the event is set — a loop built on
    it (``while ...: wait; work``) then never ends when cancelled. ``asyncio.timeout`` tells its own cancellation
    from the caller's, so a cancellation always ends the wait with ``CancelledError``."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
