"""A stored snapshot leaves no copy of itself in the process: not in aiosqlite's thread (which keeps its last call
until the next one), not in SQLite's cached statement (a bound blob stays bound until the statement runs again).
At 100,000 VMs a snapshot is ~140 MiB: each leftover copy was that much resident memory until the next snapshot."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

import pytest

from events import SQLiteEventStore, snapshot
from tests.events.store_contract import ev


def _sqlite_memory_used() -> int | None:
    """``sqlite3_memory_used()`` of the system's SQLite library, which the ``sqlite3`` module links here (None: no
    such library)."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return int(lib.sqlite3_memory_used())


async def test_a_saved_snapshot_keeps_no_copy_and_reads_back_whole(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    try:
        await store.async_append("s", [ev(), ev()])
        await store.async_release_memory()
        before = _sqlite_memory_used()
        data = b'{"state":"' + b"x" * (12 << 20) + b'"}'  # 12 MiB, not a multiple of the write chunk
        refs = sys.getrefcount(data)
        await snapshot.async_save_sealed_snapshot_data(store, "m", 2, data)
        assert sys.getrefcount(data) == refs  # nobody else holds it (aiosqlite's thread dropped its call)
        await store.async_release_memory()  # the page cache: what remains is held, not cached
        after = _sqlite_memory_used()
        if before is None or after is None:
            pytest.skip("sqlite3_memory_used is not reachable")
        assert after - before < 1 << 20, (before, after)
        loaded, why, _ = await snapshot.async_load_sealed_snapshot(store, "m")
        assert why is None and loaded is not None and loaded.position == 2
        assert loaded.state == {"state": "x" * (12 << 20)}
        # replaced whole by the next one (one row per name), shorter than the first
        await store.async_append("s", [ev()])
        await snapshot.async_save_sealed_snapshot_data(store, "m", 3, b'{"n":3}')
        loaded, why, _ = await snapshot.async_load_sealed_snapshot(store, "m")
        assert why is None and loaded is not None and (loaded.position, loaded.state) == (3, {"n": 3})
    finally:
        await store.async_close()
