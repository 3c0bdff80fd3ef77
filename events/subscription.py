"""Live subscriptions: catch up from the store, then receive events as they commit.

Each subscriber has its own queue filled by the writer without ever waiting. A subscriber that falls more
than `queue_limit` events behind is dropped back to catch-up reading from the store, so a slow consumer
never stalls the writer. The subscriber registers for live events BEFORE it reads the catch-up, and
de-duplicates by position, so the switch-over has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from .envelope import StoredEvent


class Subscriber:
    """A per-subscriber queue of committed groups; never blocks the writer."""

    __slots__ = ("_queue", "closed", "limit", "overflowed", "pending")

    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[list[StoredEvent] | None] = asyncio.Queue()
        self.limit = limit
        self.pending = 0
        self.overflowed = False
        self.closed = False

    def push(self, events: list[StoredEvent]) -> None:
        """Called by the writer after COMMIT."""
        if self.overflowed or self.closed:
            return
        if self.pending + len(events) > self.limit:
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self.pending = 0
            self._queue.put_nowait(None)
            return
        self.pending += len(events)
        self._queue.put_nowait(events)

    def close(self) -> None:
        self.closed = True
        self._queue.put_nowait(None)

    async def async_get(self) -> list[StoredEvent] | None:
        """The next committed group, or None (overflowed or closed)."""
        batch = await self._queue.get()
        if batch is not None:
            self.pending -= len(batch)
        return batch


async def async_subscribe(
    read: Callable[[int, int], Awaitable[list[StoredEvent]]],
    register: Callable[[Subscriber], None],
    unregister: Callable[[Subscriber], None],
    from_position: int = 1,
    *,
    batch_size: int = 1000,
    queue_limit: int = 10_000,
) -> AsyncIterator[StoredEvent]:
    """Yield every event from `from_position` on, forever (until the store closes)."""
    next_position = max(1, from_position)
    while True:
        sub = Subscriber(queue_limit)
        register(sub)
        try:
            while True:
                events = await read(next_position, batch_size)
                for ev in events:
                    yield ev
                    next_position = ev.position + 1
                if len(events) < batch_size:
                    break
            while True:
                batch = await sub.async_get()
                if batch is None:
                    if sub.closed:
                        return
                    break  # overflowed: catch up from the store again
                if not batch or batch[-1].position < next_position:
                    continue
                gap = False
                for ev in batch:
                    if ev.position < next_position:
                        continue
                    if ev.position != next_position:
                        gap = True
                        break
                    yield ev
                    next_position += 1
                if gap:
                    break
        finally:
            unregister(sub)
