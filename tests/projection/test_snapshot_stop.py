"""A stop is never held up by its final snapshot, and correctness never depends on one: a stop that skips it
(few events since the newest snapshot, a snapshot slower than a stop may wait, a deadline) leaves a log whose next
start folds the tail to the same model as a full replay; a kill -9 while a snapshot is being written leaves a log
that verifies and restores to the same model."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

from bench.loggen import generate
from events import NewEvent, SQLiteEventStore, verify
from moldd.app.projector import SNAPSHOT_NAME, Projector
from moldd.projection.readmodel import ReadModel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


async def _full_replay(store: SQLiteEventStore) -> dict[str, object]:
    full = ReadModel()
    for ev in await store.async_read(1):
        full.apply(ev)
    return full.to_dict()


async def _check_next_start(path: Path) -> Projector:
    """A fresh projector restored from the log (its newest sealed snapshot + the tail) equals a full replay."""
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store)
    await p.async_restore()
    assert p.model.to_dict() == await _full_replay(store)
    return p


async def test_a_stop_skips_the_snapshot_when_few_events_followed_the_newest_one(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=60, events=500)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=100)
    await p.async_restore()
    p.start()  # 500 events folded without a snapshot: one is written in the background
    await p.async_snapshot()
    written = p.snapshot_position
    assert written > 0
    p.last_snapshot_s *= 10_000  # as if the model were big: a snapshot is no longer cheap enough to write anyway
    for i in range(20):  # fewer than snapshot_every
        res = await store.async_append("vm-x", [NewEvent("vm.bench", {"i": i})])
    await p.async_wait(res.last_position)
    await p.async_stop()
    snap = await store.async_load_snapshot(SNAPSHOT_NAME)
    assert snap is not None and snap.position == written < p.model.position  # no snapshot at the stop
    await store.async_close()
    again = await _check_next_start(path)
    assert again.snapshot_position == written and again.model.position == res.last_position
    await again.store.async_close()


async def test_a_stop_skips_a_snapshot_slower_than_it_may_wait_and_the_next_start_folds_the_tail(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=60, events=500)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=10)
    await p.async_restore()
    await p.async_snapshot()
    written = p.snapshot_position
    p.last_snapshot_s *= 100_000  # as if the model were huge: a snapshot takes longer than the stop's 5 s
    p.snapshot_every = 10**9  # (no background snapshot while the tail grows)
    p.start()
    for i in range(50):
        res = await store.async_append("vm-x", [NewEvent("vm.bench", {"i": i})])
    await p.async_wait(res.last_position)
    p.snapshot_every = 10
    await p.async_stop(snapshot_timeout=5.0)
    snap = await store.async_load_snapshot(SNAPSHOT_NAME)
    assert snap is not None and snap.position == written
    await store.async_close()
    again = await _check_next_start(path)
    assert again.model.position == res.last_position
    await again.store.async_close()


async def test_a_stop_writes_a_cheap_final_snapshot_but_not_past_a_zero_deadline(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=60, events=500)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=100)
    await p.async_restore()  # 500 events since no snapshot: worth one, but no time for it
    await p.async_stop(snapshot_timeout=0.0)
    assert await store.async_load_snapshot(SNAPSHOT_NAME) is None
    await store.async_close()
    again = await _check_next_start(path)
    assert again.snapshot_position == 0
    res = await again.store.async_append("vm-x", [NewEvent("vm.bench", {})])  # one event more: a short tail,
    again.model.apply_all(await again.store.async_read(res.last_position))  # (not following: folded by hand)
    await again.async_stop()  # but a model of 60 VMs is cheap to snapshot: written
    snap = await again.store.async_load_snapshot(SNAPSHOT_NAME)
    assert snap is not None and snap.position == res.last_position
    await again.store.async_close()


async def test_a_kill_9_while_snapshots_are_written_leaves_a_log_that_verifies_and_restores(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    generate(path, vms=1500, events=9000)  # a snapshot of ~2 MiB: a kill often lands inside one
    rng = random.Random(os.getpid())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stored = 0
    for _ in range(4):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "snapshot_child.py"), str(path), stdout=asyncio.subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        writing = 0
        while writing < rng.randint(1, 3):  # wait until some snapshot is being written ...
            line = await proc.stdout.readline()
            assert line, "the child ended"
            if line.startswith(b"WRITING"):
                writing += 1
            elif line.startswith(b"DONE"):
                stored = max(stored, int(line.split()[2]))
        await asyncio.sleep(rng.uniform(0.0, 0.05))  # ... and a moment into it
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        report = verify(path)
        assert report.exit_code == 0, report.render()
        p = await _check_next_start(path)
        assert p.snapshot_position >= stored  # every snapshot acknowledged as stored is there (or a newer one)
        await p.store.async_close()
    assert stored > 0


async def test_a_background_snapshot_leaves_no_copy_of_itself_in_the_store(tmp_path: Path) -> None:
    """Writing a snapshot fills the store's page cache with its pages (up to 16 MiB for SQLite): released after it;
    and SQLite keeps no copy of the bytes (events/sqlite.py writes them through a blob handle)."""
    from tests.events.test_events_snapshot_memory import _sqlite_memory_used

    path = tmp_path / "log.db"
    generate(path, vms=3000, events=12000)
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=100)
    try:
        await p.async_restore()  # (releases what the replay read)
        before = _sqlite_memory_used()
        p.start()  # a long tail folded: a background snapshot starts at once
        task = p._snapshot_task
        assert task is not None
        await task
        after = _sqlite_memory_used()  # (before reading the snapshot back, which fills the cache again)
        row = await store._async_get_snapshot(SNAPSHOT_NAME)
        assert row is not None and row[0] == p.snapshot_position > 0
        state_bytes = len(row[2])
        assert state_bytes > 3 << 20
        if before is not None and after is not None:  # (None: no system SQLite library to ask)
            assert after - before < state_bytes // 4, (before, after, state_bytes)
    finally:
        await p.async_stop(snapshot=False)
        await store.async_close()
