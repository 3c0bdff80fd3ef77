"""The SQLite store's write thread (COMMITs on a connection and thread of their own, settled in one callback)
and the writer's fast path (an uncontended request planned by a plain callback, not the writer task)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import events.sqlite as sqlite_mod
from events import SQLiteEventStore, StoreClosedError, verify
from events.writer import AppendRequest
from tests.events.store_contract import ev

GATES: list[threading.Event] = []


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteEventStore]:
    s = await SQLiteEventStore.async_open(tmp_path / "log.db")
    try:
        yield s
    finally:
        for gate in GATES:  # a failed test must not leave the thread held
            gate.set()
        GATES.clear()
        await asyncio.wait_for(s.async_close(), 10)


class ThreadGate:
    """Holds the write thread: a job that waits until released, so that what is handed over after it queues."""

    def __init__(self, store: SQLiteEventStore) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        GATES.append(self.release)

        def block() -> None:
            self.started.set()
            self.release.wait(30)

        store._writes.submit(block, (), lambda result, error: None)

    async def async_wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


def count_planning_by_the_writer_task(store: SQLiteEventStore) -> list[int]:
    """Counts the groups the writer TASK processes (the fast path does not go through it)."""
    calls: list[int] = []
    real = store._writer._async_process

    async def counting(group: list[AppendRequest]) -> None:
        calls.append(len(group))
        await real(group)

    store._writer._async_process = counting  # type: ignore[method-assign]
    return calls


async def until(cond: Callable[[], bool]) -> None:
    """Let the loop run until `cond()` holds (bounded: fails rather than hangs)."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_the_write_connection_is_durable_and_separate(store: SQLiteEventStore) -> None:
    conn = store._writes.conn
    assert conn is not None and conn is not store._conn._conn

    def pragmas() -> tuple[int, str, int]:
        assert conn is not None
        return (
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA busy_timeout").fetchone()[0],
        )

    assert await store._writes.async_run(pragmas) == (2, "wal", 10000)  # synchronous=FULL: every COMMIT fsynced
    res = await store.async_append("s", [ev()])
    # read back at once through the other connection: a COMMIT is visible to reads once the append returned
    assert [e.hash for e in await store.async_read_stream("s")] == [res.events[0].hash]


async def test_the_fast_path_answers_concurrent_retries_of_a_known_command_with_the_original(
    store: SQLiteEventStore,
) -> None:
    first = await store.async_append("s", [ev(n=0)], command_id="c0")
    planned = count_planning_by_the_writer_task(store)
    results = await asyncio.gather(
        *(store.async_append("s", [ev(n=0)], command_id="c0") for _ in range(20)),
        store.async_append("s", [ev(n=1)]),
    )
    retries, new = results[:-1], results[-1]
    assert all(r.duplicate and r.events == first.events for r in retries)
    assert (new.last_position, new.stream_version, new.duplicate) == (2, 2, False)
    assert planned == []  # everything went through the fast path: the writer task planned nothing
    assert [e.position for e in await store.async_read()] == [1, 2]


async def test_concurrent_duplicates_of_a_new_command_id_are_written_once(store: SQLiteEventStore) -> None:
    await store.async_append("s", [ev(n=0)])  # the stream is known: only the new command id needs a lookup
    planned = count_planning_by_the_writer_task(store)
    results = await asyncio.gather(*(store.async_append("s", [ev(n=1)], command_id="c1") for _ in range(20)))
    assert sum(not r.duplicate for r in results) == 1
    assert all(r.events == results[0].events for r in results) and results[0].last_position == 2
    assert planned == [20]  # a lookup was needed: the writer task planned them, as one group
    # now known: a retry goes through the fast path and is answered from the cache
    again = await store.async_append("s", [ev(n=1)], command_id="c1")
    assert again.duplicate and again.events == results[0].events and planned == [20]
    assert len(await store.async_read()) == 2


async def test_a_fast_request_queued_with_one_needing_a_lookup_goes_through_the_writer(
    store: SQLiteEventStore,
) -> None:
    await store.async_append("known", [ev()])
    planned = count_planning_by_the_writer_task(store)
    a, b = await asyncio.gather(store.async_append("known", [ev()]), store.async_append("new", [ev()]))
    assert (a.stream_version, b.stream_version) == (2, 1) and planned == [2]
    assert b.events[0].prev_hash == a.events[0].hash


async def test_a_conflict_on_the_fast_path_fails_alone_and_writes_nothing(store: SQLiteEventStore) -> None:
    await store.async_append("s", [ev()])
    head = await store.async_head()
    from events import ConcurrencyError

    with pytest.raises(ConcurrencyError):
        await store.async_append("s", [ev()], expected_version=0)
    assert await store.async_head() == head


async def test_cancelling_the_writer_while_a_fast_path_commit_waits_on_the_thread_reports_it_written(
    store: SQLiteEventStore, tmp_path: Path
) -> None:
    await store.async_append("s", [ev()])
    gate = ThreadGate(store)
    await gate.async_wait_started()
    planned = count_planning_by_the_writer_task(store)
    append = asyncio.create_task(store.async_append("s", [ev()], expected_version=1))
    await until(lambda: bool(store._writer._inflight))  # handed to the (held) thread by the fast path
    assert planned == []
    writer_task = store._writer._task
    assert writer_task is not None
    writer_task.cancel()
    await asyncio.sleep(0.01)
    assert not append.done()  # its outcome is not known yet: nobody is told "failed"
    gate.release.set()
    res = await asyncio.wait_for(append, 10)
    assert (res.last_position, res.duplicate) == (2, False)
    with pytest.raises(StoreClosedError):
        await asyncio.wait_for(store.async_append("s", [ev()]), 5)
    assert [e.position for e in await store.async_read()] == [1, 2]


async def test_cancelling_the_writer_twice_mid_commit_says_unknown_and_the_late_outcome_is_ignored(
    tmp_path: Path,
) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    await store.async_append("s", [ev()])
    gate = ThreadGate(store)
    await gate.async_wait_started()
    append = asyncio.create_task(store.async_append("s", [ev()], expected_version=1))
    await until(lambda: bool(store._writer._inflight))  # the fast path: no lookup needed
    writer_task = store._writer._task
    assert writer_task is not None
    writer_task.cancel()
    await asyncio.sleep(0.01)
    writer_task.cancel()  # the second cancellation gives up waiting for the COMMIT's outcome
    with pytest.raises(StoreClosedError, match="unknown"):
        await asyncio.wait_for(append, 10)
    gate.release.set()  # the COMMIT now runs (and is written); its late callback must change nothing
    await asyncio.wait_for(store.async_close(), 10)
    report = verify(tmp_path / "log.db")
    assert report.exit_code == 0 and report.events_checked == 2, report.render()
    again = await SQLiteEventStore.async_open(tmp_path / "log.db")
    try:  # "unknown" means: read the stream -- it was written
        assert [e.stream_version for e in await again.async_read_stream("s")] == [1, 2]
    finally:
        await again.async_close()


async def test_a_failed_commit_on_the_thread_fails_the_group_chained_onto_it_and_nothing_is_written(
    store: SQLiteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.async_append("s", [ev(n=0)])
    head = await store.async_head()
    real_commit = sqlite_mod._commit_known
    calls: list[int] = []

    def failing_once(conn: Any, rows: Any, head: int | None) -> int:
        calls.append(rows[0][0])
        if len(calls) == 1:
            raise OSError("disk on fire")
        return real_commit(conn, rows, head)  # the group chained onto the failed one: refused by the head check

    monkeypatch.setattr(sqlite_mod, "_commit_known", failing_once)
    gate = ThreadGate(store)
    await gate.async_wait_started()
    a = asyncio.create_task(store.async_append("s", [ev(n=1)], expected_version=1))
    await until(lambda: len(store._writer._inflight) == 1)
    b = asyncio.create_task(store.async_append("s", [ev(n=2)], expected_version=2))
    await until(lambda: len(store._writer._inflight) == 2)  # B planned on A's uncommitted head (pipelining)
    gate.release.set()
    ra, rb = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), 10)
    assert isinstance(ra, OSError) and isinstance(rb, OSError), (ra, rb)  # B is told A's cause
    assert calls == [2, 3]  # B's COMMIT did reach the database, which refused it (head check)
    assert await store.async_head() == head and len(await store.async_read()) == 1
    # the writer goes on from the committed state: the versions unchanged, the commands new
    monkeypatch.setattr(sqlite_mod, "_commit_known", real_commit)
    ra2 = await store.async_append("s", [ev(n=1)], expected_version=1, command_id="ca")
    rb2 = await store.async_append("s", [ev(n=2)], expected_version=2, command_id="cb")
    assert not ra2.duplicate and not rb2.duplicate
    assert (ra2.last_position, rb2.last_position) == (2, 3) and ra2.events[0].prev_hash == head[1]


async def test_close_finishes_commits_queued_on_the_thread_and_ends_it(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    await store.async_append("s", [ev()])
    gate = ThreadGate(store)
    await gate.async_wait_started()
    appends = [asyncio.create_task(store.async_append(f"s{i % 3}", [ev(i=i)])) for i in range(10)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.async_close())
    await asyncio.sleep(0.01)
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(*appends), 10)
    await asyncio.wait_for(closing, 10)
    assert sorted(r.last_position for r in results) == list(range(2, 12))
    thread = store._writes._thread
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive() and store._writes.conn is None
    assert verify(tmp_path / "log.db").exit_code == 0


async def test_a_row_written_behind_the_stores_back_makes_the_next_commit_refuse_as_head_moved(
    store: SQLiteEventStore, tmp_path: Path
) -> None:
    """The write thread checks the head it knows in Python; a row another process stored meanwhile is still
    refused by the database (the position is taken), reported as head_moved, and nothing of the group is written."""
    import sqlite3

    from events import EventLogError
    from events.sqlite import COLUMNS

    first = await store.async_append("s", [ev()])
    other = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    try:
        row = list(other.execute(f"SELECT {COLUMNS} FROM events WHERE position = 1").fetchone())
        row[0], row[1] = 2, "intruder"
        other.execute(f"INSERT INTO events ({COLUMNS}) VALUES ({','.join('?' * 13)})", row)
    finally:
        other.close()
    with pytest.raises(EventLogError) as info:
        await store.async_append("s", [ev(), ev()], expected_version=1)
    assert info.value.code == "head_moved" and "head is 2" in str(info.value)
    assert [(e.position, e.stream_id) for e in await store.async_read()] == [(1, "s"), (2, "intruder")]
    assert first.last_position == 1
