from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from events import EventStore, MemoryEventStore, NewEvent, NotALogError, SQLiteEventStore, verify
from events.sqlite import SCHEMA_VERSION
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
    conn.execute("INSERT INTO commands VALUES ('legacy', 's', 1, 1, 1)")  # the table of schema 1 (unused now)
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


async def test_replace_cannot_swap_rows_of_events_commands_or_meta(tmp_path: Path) -> None:
    """SQLite's REPLACE deletes the old row without firing DELETE triggers: a BEFORE INSERT trigger refuses it."""
    path = tmp_path / "log.db"
    store = await SQLiteEventStore.async_open(path)
    await store.async_append("s", [ev(n=1), ev(n=2)], command_id="c")
    await store.async_close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO commands VALUES ('legacy', 's', 1, 2, 2)")
    before = conn.execute("SELECT * FROM events ORDER BY position").fetchall()
    row = list(before[0])
    row[10] = b'{"n":99}'
    cols = "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, " \
        "causation_id, correlation_id, payload, prev_hash, hash"
    other_pos = [*row]
    other_pos[0] = 77  # same stream version, new position: a UNIQUE(stream_id, stream_version) REPLACE
    for verb in ("INSERT OR REPLACE INTO", "REPLACE INTO"):
        for values in (row, other_pos):
            with pytest.raises(sqlite3.IntegrityError, match="REPLACE"):
                conn.execute(f"{verb} events ({cols}) VALUES ({','.join('?' * 13)})", values)
        with pytest.raises(sqlite3.IntegrityError, match="REPLACE"):
            conn.execute(f"{verb} meta (key, value) VALUES ('log_id', 'forged')")
        with pytest.raises(sqlite3.IntegrityError, match="REPLACE"):
            conn.execute(f"{verb} commands VALUES ('legacy', 'x', 9, 9, 9)")
    assert conn.execute("SELECT * FROM events ORDER BY position").fetchall() == before
    conn.close()
    assert verify(path).exit_code == 0


async def test_a_forged_commands_row_changes_no_idempotent_answer(tmp_path: Path) -> None:
    """Command ids are derived from the chained rows: a row in the legacy `commands` table (another
    command's events, or positions past the end of the log) is never an answer."""
    path = tmp_path / "log.db"
    store = await SQLiteEventStore.async_open(path)
    first = await store.async_append("vm-a", [ev(n=1)], command_id="c1")
    await store.async_close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO commands VALUES ('c2', 'vm-a', 1, 1, 1)")  # points at c1's events
    conn.execute("INSERT INTO commands VALUES ('c3', 'vm-b', 50, 60, 3)")  # past the end of the log
    conn.close()
    store = await SQLiteEventStore.async_open(path)
    try:
        assert await store.async_find_command("c2") is None and await store.async_find_command("c3") is None
        r2 = await store.async_append("vm-b", [ev(n=2)], command_id="c2")
        r3 = await store.async_append("vm-c", [ev(n=3)], command_id="c3")
        assert not r2.duplicate and r2.stream_id == "vm-b" and r2.last_position == 2
        assert not r3.duplicate and r3.stream_id == "vm-c" and r3.last_position == 3
        again = await store.async_append("vm-z", [ev()], command_id="c1")
        assert again.duplicate and again.events == first.events
        found = await store.async_find_command("c2")
        assert found is not None and found.events == r2.events
    finally:
        await store.async_close()


async def test_a_schema_1_log_is_migrated_and_its_dropped_triggers_put_back(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = await SQLiteEventStore.async_open(path)
    await store.async_append("s", [ev()], command_id="c")
    await store.async_close()
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'index')").fetchall():
        if name.startswith(("events_no", "commands_no", "meta_no", "events_command_id")):
            conn.execute(f"DROP {'INDEX' if name == 'events_command_id' else 'TRIGGER'} {name}")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = await SQLiteEventStore.async_open(path)
    assert (await store.async_append("s", [ev()], command_id="c")).duplicate
    await store.async_close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert names >= {"events_no_update", "events_no_delete", "events_no_replace", "meta_no_replace"}
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
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
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
