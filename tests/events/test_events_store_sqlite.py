from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from events import EventStore, MemoryEventStore, NewEvent, NotALogError, SQLiteEventStore, verify
from tests.events.store_contract import StoreContract, ev


class TestSQLiteEventStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.n = 0

    async def make_store(self, **kw: Any) -> EventStore:
        self.n += 1
        return await SQLiteEventStore.async_open(self.tmp / f"log{self.n}.db", **kw)


async def test_rows_cannot_be_updated_or_deleted_even_with_plain_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = await SQLiteEventStore.async_open(path)
    await store.async_append("s", [ev()], command_id="c")
    await store.async_close()
    conn = sqlite3.connect(path)
    for sql in (
        "UPDATE events SET payload = x'00'",
        "DELETE FROM events",
        "UPDATE commands SET stream_id = 'x'",
        "DELETE FROM commands",
        "UPDATE meta SET value = 'x' WHERE key = 'log_id'",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    conn.close()


async def test_reopened_log_continues_the_chain_and_keeps_command_ids(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = await SQLiteEventStore.async_open(path)
    first = await store.async_append("s", [ev(), ev()], command_id="c1")
    log_id = store.log_id
    await store.async_close()
    store = await SQLiteEventStore.async_open(path)
    assert store.log_id == log_id
    assert (await store.async_append("s", [ev()], command_id="c1")).events == first.events
    res = await store.async_append("s", [ev()], expected_version=2)
    assert res.last_position == 3 and res.events[0].prev_hash == first.events[-1].hash
    await store.async_close()
    assert verify(path).exit_code == 0


async def test_database_is_in_wal_mode_with_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    await (await SQLiteEventStore.async_open(path)).async_close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


async def test_opening_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(NotALogError):
        await SQLiteEventStore.async_open(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(NotALogError):
        await SQLiteEventStore.async_open(junk)


async def test_memory_and_sqlite_backends_build_the_same_chain(tmp_path: Path) -> None:
    sq = await SQLiteEventStore.async_open(tmp_path / "log.db", clock=lambda: 1_700_000_000_000_000)
    mem = MemoryEventStore(log_id=sq.log_id, clock=lambda: 1_700_000_000_000_000)
    for s in (sq, mem):
        await s.async_append("a", [NewEvent("x", {"k": [1, "é"]}, causation_id="c")], command_id="id")
        await s.async_append("b", [ev(n=2), ev(n=3)])
    assert await sq.async_head() == await mem.async_head()
    assert await sq.async_read() == await mem.async_read()
    await sq.async_close()
    await mem.async_close()


async def test_many_concurrent_appenders_are_grouped_and_all_committed(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")

    async def appender(i: int) -> None:
        for k in range(20):
            await store.async_append(f"s-{i}", [ev(k=k)], expected_version=k)

    await asyncio.gather(*(appender(i) for i in range(32)))
    assert (await store.async_head())[0] == 640
    await store.async_close()
    assert verify(tmp_path / "log.db").exit_code == 0
