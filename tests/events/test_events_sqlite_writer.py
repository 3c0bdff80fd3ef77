"""The SQLite writer's pipelining (group N+1 planned while N commits) and schema 3 (no recorded_at index)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from events import ConcurrencyError, EventLogError, SQLiteEventStore, verify
from events.sqlite import PAGE_SIZE, SCHEMA_VERSION, WAL_AUTOCHECKPOINT_BYTES, _commit
from tests.events.store_contract import ev

V2_LOG = Path(__file__).parent / "data" / "log-v2.db"
"""A log written by the schema-2 store (main at 28a46d1): 22 events on vm-0..2, command ids, a correlation id,
a snapshot "p" at position 10."""


class Gate:
    """Holds the store's COMMITs: each call waits until released, then runs the real one (or raises)."""

    def __init__(self, store: SQLiteEventStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = store._async_commit
        self.calls: list[asyncio.Event] = []
        self.entered = asyncio.Event()
        self.fail: dict[int, BaseException] = {}
        monkeypatch.setattr(store, "_async_commit", self.commit)

    async def commit(self, rows: Any, commands: Any) -> None:
        i = len(self.calls)
        gate = asyncio.Event()
        self.calls.append(gate)
        self.entered.set()
        await gate.wait()
        if i in self.fail:
            raise self.fail[i]
        await self.real(rows, commands)

    async def async_wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self.entered.clear()
            await asyncio.wait_for(self.entered.wait(), 5)


async def _open(tmp_path: Path, name: str = "log.db", **kw: Any) -> SQLiteEventStore:
    return await SQLiteEventStore.async_open(tmp_path / name, **kw)


async def test_the_next_group_is_planned_while_one_commits_and_both_are_written_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _open(tmp_path)
    try:
        gate = Gate(store, monkeypatch)
        a = asyncio.create_task(store.async_append("a", [ev(n=1)], command_id="ca"))
        await gate.async_wait_calls(1)
        b = asyncio.create_task(store.async_append("b", [ev(n=2), ev(n=3)]))
        await gate.async_wait_calls(2)  # B was chained onto A's uncommitted head and handed over
        assert store._writer.head_position == 0  # nothing is committed yet
        gate.calls[0].set()
        gate.calls[1].set()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 5)
        assert (ra.last_position, rb.last_position) == (1, 3)
        assert rb.events[0].prev_hash == ra.events[-1].hash
        assert await store.async_head() == (3, rb.events[-1].hash)
    finally:
        await store.async_close()
    assert verify(tmp_path / "log.db").exit_code == 0


async def test_a_group_chained_onto_a_failed_one_fails_too_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _open(tmp_path)
    try:
        await store.async_append("s", [ev(n=0)])
        head = await store.async_head()
        gate = Gate(store, monkeypatch)
        gate.fail[0] = OSError("disk on fire")
        a = asyncio.create_task(store.async_append("s", [ev(n=1)], expected_version=1, command_id="ca"))
        await gate.async_wait_calls(1)
        b = asyncio.create_task(store.async_append("t", [ev(n=2)], command_id="cb"))
        await gate.async_wait_calls(2)
        gate.calls[1].set()  # B's real COMMIT runs first: it does not start after the stored head: refused
        await asyncio.sleep(0.05)
        gate.calls[0].set()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 5)
        assert isinstance(ra, OSError) and isinstance(rb, OSError), (ra, rb)  # B is told A's cause
        assert await store.async_head() == head
        assert [e.position for e in await store.async_read()] == [1]
        # the writer goes on from the committed state: the same commands are new, the versions unchanged
        monkeypatch.setattr(store, "_async_commit", gate.real)
        ra = await store.async_append("s", [ev(n=1)], expected_version=1, command_id="ca")
        rb = await store.async_append("t", [ev(n=2)], expected_version=0, command_id="cb")
        assert not ra.duplicate and not rb.duplicate
        assert (ra.last_position, rb.last_position) == (2, 3) and ra.events[0].prev_hash == head[1]
    finally:
        await store.async_close()
    assert verify(tmp_path / "log.db").exit_code == 0


async def test_a_retry_of_a_command_in_flight_stands_or_falls_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _open(tmp_path)
    try:
        gate = Gate(store, monkeypatch)
        a = asyncio.create_task(store.async_append("s", [ev(n=1)], command_id="c"))
        await gate.async_wait_calls(1)
        retry = asyncio.create_task(store.async_append("s", [ev(n=1)], command_id="c"))
        await asyncio.sleep(0.05)
        assert not retry.done() and len(gate.calls) == 1  # nothing to write: no second COMMIT
        gate.calls[0].set()
        ra, rr = await asyncio.wait_for(asyncio.gather(a, retry), 5)
        assert not ra.duplicate and rr.duplicate and rr.events == ra.events
        # ... and when the command's group fails, its retry fails with it (it was never written)
        gate.fail[1] = OSError("disk on fire")
        b = asyncio.create_task(store.async_append("s", [ev(n=2)], command_id="d"))
        await gate.async_wait_calls(2)
        retry = asyncio.create_task(store.async_append("s", [ev(n=2)], command_id="d"))
        await asyncio.sleep(0.05)
        gate.calls[1].set()
        rb, rr = await asyncio.wait_for(asyncio.gather(b, retry, return_exceptions=True), 5)
        assert isinstance(rb, OSError) and isinstance(rr, OSError), (rb, rr)
        assert await store.async_find_command("d") is None
    finally:
        await store.async_close()


@pytest.mark.parametrize("first_fails", [False, True])
async def test_a_conflict_with_a_group_in_flight_is_told_only_once_that_group_is_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_fails: bool
) -> None:
    store = await _open(tmp_path)
    try:
        gate = Gate(store, monkeypatch)
        if first_fails:
            gate.fail[0] = OSError("disk on fire")
        a = asyncio.create_task(store.async_append("s", [ev()], expected_version=0))
        await gate.async_wait_calls(1)
        b = asyncio.create_task(store.async_append("s", [ev()], expected_version=0))
        await asyncio.sleep(0.05)
        assert not b.done()  # whether B conflicts depends on A's COMMIT
        gate.calls[0].set()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 5)
        if first_fails:
            assert isinstance(ra, OSError) and isinstance(rb, OSError), (ra, rb)
        else:
            assert isinstance(rb, ConcurrencyError) and rb.actual == 1, rb
            assert not isinstance(ra, BaseException) and ra.stream_version == 1
    finally:
        await store.async_close()


async def test_cancelling_the_writer_with_two_groups_in_flight_reports_both_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _open(tmp_path)
    try:
        gate = Gate(store, monkeypatch)
        a = asyncio.create_task(store.async_append("a", [ev()], command_id="ca"))
        await gate.async_wait_calls(1)
        b = asyncio.create_task(store.async_append("b", [ev()], command_id="cb"))
        await gate.async_wait_calls(2)
        task = store._writer._task
        assert task is not None
        task.cancel()
        await asyncio.sleep(0.01)
        gate.calls[0].set()
        gate.calls[1].set()
        ra, rb = await asyncio.wait_for(asyncio.gather(a, b), 5)  # both were written: their callers are told so
        assert (ra.last_position, rb.last_position) == (1, 2)
        assert [e.position for e in await store.async_read()] == [1, 2]
    finally:
        await asyncio.wait_for(store.async_close(), 5)


async def test_the_commit_refuses_a_group_that_does_not_start_after_the_stored_head(tmp_path: Path) -> None:
    store = await _open(tmp_path)
    first = await store.async_append("s", [ev()])
    await store.async_close()
    conn = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    row = list(await_row(conn, 1))
    for position in (1, 3, 0):  # onto the head, past a gap, before the log
        row[0] = position
        with pytest.raises(EventLogError) as info:
            _commit(conn, [tuple(row)], [])
        assert info.value.code == "head_moved" and not conn.in_transaction
        big = [(position + i, *row[1:]) for i in range(600)]  # more rows than one statement takes
        with pytest.raises(EventLogError) as info:
            _commit(conn, big, [])
        assert info.value.code == "head_moved" and not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    conn.close()
    assert first.last_position == 1


async def test_a_group_bigger_than_one_insert_statement_is_one_transaction(tmp_path: Path) -> None:
    store = await _open(tmp_path)
    try:
        small = await store.async_append("s", [ev(i=0)])
        big = await store.async_append("s", [ev(i=i) for i in range(1, 601)], expected_version=1)
        assert big.last_position == 601 and big.events[0].prev_hash == small.events[0].hash
        assert [e.payload["i"] for e in await store.async_read_stream("s")] == list(range(601))
    finally:
        await store.async_close()
    assert verify(tmp_path / "log.db").exit_code == 0


def await_row(conn: sqlite3.Connection, position: int) -> tuple[Any, ...]:
    from events.sqlite import COLUMNS

    return tuple(conn.execute(f"SELECT {COLUMNS} FROM events WHERE position = ?", (position,)).fetchone())


async def test_many_appenders_with_pipelining_write_one_unbroken_chain(tmp_path: Path) -> None:
    store = await _open(tmp_path)
    commits: list[int] = []
    store._writer.on_commit = lambda n, s, ok: commits.append(n)
    try:

        async def appender(i: int) -> None:
            for k in range(40):
                await store.async_append(f"vm-{i}", [ev(k=k)], command_id=f"c-{i}-{k}" if k % 3 else None)

        await asyncio.wait_for(asyncio.gather(*(appender(i) for i in range(32))), 60)
        assert sum(commits) == 32 * 40 and len(commits) < 32 * 40  # grouped
        for i in range(32):
            assert [e.stream_version for e in await store.async_read_stream(f"vm-{i}")] == list(range(1, 41))
    finally:
        await store.async_close()
    report = verify(tmp_path / "log.db")
    assert report.exit_code == 0 and report.events_checked == 32 * 40, report.render()


# ---- schema 3 ----------------------------------------------------------------------------------------------
async def test_a_new_log_has_no_recorded_at_index(tmp_path: Path) -> None:
    await (await _open(tmp_path)).async_close()
    conn = sqlite3.connect(tmp_path / "log.db")
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert "events_recorded_at" not in names and "events_command_id" in names


def _page_size(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


async def test_a_new_log_has_small_pages_and_an_existing_log_keeps_its_own(tmp_path: Path) -> None:
    store = await _open(tmp_path)
    try:
        await store.async_append("vm-1", [ev(n=i) for i in range(300)])
        # the WAL is checkpointed after the same number of bytes whatever the page size
        auto = await (await store._conn.execute("PRAGMA wal_autocheckpoint")).fetchone()
        assert auto is not None and auto[0] == WAL_AUTOCHECKPOINT_BYTES // PAGE_SIZE
    finally:
        await store.async_close()
    assert PAGE_SIZE < 4096 and _page_size(tmp_path / "log.db") == PAGE_SIZE
    old = tmp_path / "old.db"
    shutil.copyfile(V2_LOG, old)
    assert _page_size(old) == 4096
    store = await SQLiteEventStore.async_open(old)
    try:
        await store.async_append("vm-1", [ev(n=i) for i in range(300)])
    finally:
        await store.async_close()
    assert _page_size(old) == 4096
    report = verify(old)
    assert report.exit_code == 0 and report.events_checked == 322, report.render()


async def test_a_schema_2_log_written_by_the_previous_store_is_migrated_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    shutil.copyfile(V2_LOG, path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    before = conn.execute("SELECT * FROM events ORDER BY position").fetchall()
    conn.close()
    assert len(before) == 22
    store = await SQLiteEventStore.async_open(path)
    try:
        events = await store.async_read()
        assert [e.position for e in events] == list(range(1, 23))
        # idempotency, per-stream reads, correlation and time reads of the old rows
        again = await store.async_append("vm-1", [ev()], command_id="cmd-1")
        assert again.duplicate and again.events[0].position == 2
        pair = await store.async_append("vm-0", [ev()], command_id="cmd-pair")
        assert pair.duplicate and [e.position for e in pair.events] == [21, 22]
        assert [e.payload["i"] for e in await store.async_read_stream("vm-2")] == [2, 5, 8, 11, 14, 17]
        assert [e.position for e in await store.async_read_correlated("job-1")] == [22]
        since = events[5].recorded_at
        want = [e.position for e in events if e.recorded_at >= since]
        assert [e.position for e in await store.async_read_since(since)] == want and want[0] <= 6
        snap = await store.async_load_snapshot("p")
        assert snap is not None and snap.position == 10
        new = await store.async_append("vm-1", [ev(n=1)], expected_version=7, command_id="new")
        assert new.last_position == 23 and new.events[0].prev_hash == events[-1].hash
    finally:
        await store.async_close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_recorded_at" not in names and {"events_command_id", "events_correlation"} <= names
    assert conn.execute("SELECT * FROM events WHERE position <= 22 ORDER BY position").fetchall() == before
    conn.close()
    report = verify(path)
    assert report.exit_code == 0 and report.events_checked == 23, report.render()
