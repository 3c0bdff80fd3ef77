"""Snapshots of the read model: written in the background (the fold goes on meanwhile), encoded to the same
canonical bytes as before, restored to the same model as a full replay, and never holding up a stop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.loggen import generate
from events import NewEvent, SQLiteEventStore
from events.canonical import canonical_json, loads
from moldd.app.projector import SNAPSHOT_NAME, Projector, encode_snapshot
from moldd.projection.readmodel import ReadModel


async def _restored(path: Path) -> Projector:
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=50)
    await p.async_restore()
    return p


async def test_snapshot_bytes_decode_to_the_canonical_json_of_the_model(tmp_path: Path) -> None:
    generate(tmp_path / "log.db", vms=300, events=3000)
    p = await _restored(tmp_path / "log.db")
    try:
        data = encode_snapshot(p.model.snapshot_parts())
        assert loads(data) == loads(canonical_json(p.model.to_dict()))
        assert data == canonical_json(p.model.to_dict())  # the same bytes, as long as no float needs an exponent
        odd = {"position": 0, "vms": {"a": {"big": 2**70, "f": 1e16, "t": "é\u2028"}}, "next_vm_id": 1}
        assert loads(encode_snapshot(odd)) == odd  # orjson refuses 2**70: the canonical encoder takes over
    finally:
        await p.store.async_close()


async def test_a_model_restored_from_the_snapshot_equals_a_full_replay(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=200, events=2500)
    p = await _restored(path)
    await p.async_snapshot()  # appends the snapshot's seal to the log (events.snapshot)
    snapshot_position = p.snapshot_position
    full = ReadModel()
    for ev in await p.store.async_read(1):
        full.apply(ev)
    replayed = full.to_dict()
    await p.store.async_close()
    again = await _restored(path)
    try:
        assert again.snapshot_position == snapshot_position > 0
        assert again.model.to_dict() == replayed
        assert again.model.to_dict() == ReadModel.from_dict(replayed).to_dict()
    finally:
        await again.store.async_close()


class HeldSnapshots:
    """Stands between the projector and the store's snapshot write (after its seal was appended): holds every
    write until released."""

    def __init__(self, store: Any) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.written: list[int] = []
        self._save = store._async_put_snapshot
        store._async_put_snapshot = self.save

    async def save(self, name: str, row: Any) -> None:
        self.started.set()
        await self.release.wait()
        await self._save(name, row)
        self.written.append(row[0])


async def test_the_fold_goes_on_while_a_snapshot_is_being_written(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    p = Projector(store, snapshot_every=10)
    held = HeldSnapshots(store)
    await p.async_restore()
    p.start()
    try:
        for i in range(10):
            await store.async_append("vm-x", [NewEvent("vm.bench", {"i": i})])
        await held.started.wait()  # the 10th event started a snapshot, which is held
        last = None
        for i in range(40):
            last = await store.async_append("vm-x", [NewEvent("vm.bench", {"i": i})])
        assert last is not None
        await p.async_wait(last.last_position)  # folded although the snapshot is still unwritten
        assert held.written == [] and p.model.position == last.last_position
        held.release.set()
        await p.async_snapshot()  # waits for the running one, then snapshots the head
        assert held.written == [10, last.last_position]
        snap = await store.async_load_snapshot(SNAPSHOT_NAME)
        assert snap is not None and snap.position == last.last_position
    finally:
        held.release.set()
        await p.async_stop()
        await store.async_close()


async def test_a_stop_does_not_wait_for_a_snapshot_beyond_its_timeout(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    p = Projector(store, snapshot_every=1)  # every event is worth a snapshot
    held = HeldSnapshots(store)  # never released: a snapshot that would take forever
    await p.async_restore()
    p.start()
    try:
        res = await store.async_append("vm-x", [NewEvent("vm.bench", {})])
        await p.async_wait(res.last_position)
        await p.async_stop(snapshot_timeout=0.05)  # returns: the snapshot is given up, not awaited
        assert held.started.is_set() and held.written == []
        assert await store.async_load_snapshot(SNAPSHOT_NAME) is None
    finally:
        held.release.set()
        await store.async_close()


async def test_a_long_tail_folded_at_start_is_snapshotted_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=50, events=400)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=100)
    held = HeldSnapshots(store)
    await p.async_restore()
    folded = p.model.position
    p.start()  # 400 events folded, no snapshot: one starts at once
    try:
        await held.started.wait()
        held.release.set()
        await p.async_snapshot()
        assert held.written[0] == folded  # (its seal is the next event of the log)
    finally:
        held.release.set()
        await p.async_stop()
        await store.async_close()


async def test_the_tail_snapshot_can_wait_until_the_daemon_is_ready(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=50, events=400)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=100)
    held = HeldSnapshots(store)
    await p.async_restore()
    folded = p.model.position
    p.start(snapshot_tail=False)  # as the daemon starts it: nothing yet
    try:
        assert p._snapshot_task is None and not held.started.is_set()
        p.snapshot_tail()  # once ready
        await held.started.wait()
        held.release.set()
        await p.async_snapshot()
        assert held.written[0] == folded
    finally:
        held.release.set()
        await p.async_stop()
        await store.async_close()
