"""Projector listeners: add_listener returns the unsubscribe handle (idempotent, callable from inside the
listener without skipping the others), and a coroutine function is refused (it would never run)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from events import NewEvent, SQLiteEventStore, StoredEvent
from moldd.app.projector import Projector
from moldd.projection.readmodel import ReadModel


@pytest.fixture
async def projector(tmp_path: Path) -> AsyncIterator[Projector]:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    p = Projector(store)
    await p.async_restore()
    p.start()
    try:
        yield p
    finally:
        await p.async_stop(snapshot=False)
        await store.async_close()


async def _append(p: Projector, n: int = 1) -> int:
    desc = {"name": "h1", "uri": "test:///default", "cluster": "c1", "max_vms": 4}
    res = await p.store.async_append("host-h1", [NewEvent("host.registered", desc) for _ in range(n)])
    await p.async_wait(res.last_position)
    return res.last_position


async def test_unsubscribe_stops_the_calls_and_is_idempotent(projector: Projector) -> None:
    seen: list[int] = []
    unsubscribe = projector.add_listener(lambda ev, model: seen.append(ev.position))
    first = await _append(projector)
    unsubscribe()
    unsubscribe()  # again: no effect, no error
    await _append(projector)
    assert seen == [first]
    assert projector.listeners == []


async def test_a_listener_that_unsubscribes_itself_does_not_make_the_next_one_miss_the_event(
    projector: Projector,
) -> None:
    seen: list[tuple[str, int]] = []
    handles: dict[str, Callable[[], None]] = {}

    def once(ev: StoredEvent, model: ReadModel) -> None:
        seen.append(("once", ev.position))
        handles["once"]()

    handles["once"] = projector.add_listener(once)
    projector.add_listener(lambda ev, model: seen.append(("always", ev.position)))
    first = await _append(projector)
    second = await _append(projector)
    assert seen == [("once", first), ("always", first), ("always", second)]


async def test_the_same_callback_twice_needs_two_unsubscribes(projector: Projector) -> None:
    seen: list[int] = []

    def cb(ev: StoredEvent, model: ReadModel) -> None:
        seen.append(ev.position)

    a, b = projector.add_listener(cb), projector.add_listener(cb)
    pos = await _append(projector)
    a()
    pos2 = await _append(projector)
    b()
    await _append(projector)
    assert seen == [pos, pos, pos2]


async def test_a_coroutine_function_is_refused(projector: Projector) -> None:
    async def not_a_callback(ev: StoredEvent, model: ReadModel) -> None:
        return None

    with pytest.raises(TypeError, match="coroutine function"):
        projector.add_listener(not_a_callback)  # type: ignore[arg-type]
    assert projector.listeners == []
