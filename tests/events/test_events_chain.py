"""The chain's framing is unambiguous, and verify sees the edits a naive concatenation would miss."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from events import NewEvent, SQLiteEventStore, verify
from events.chain import encode_fields, link_hash
from tests.events.conftest import drop_triggers_copy


def test_fields_framing_separates_null_empty_and_boundaries() -> None:
    base = encode_fields("s", "t", "ab", "c", None, None)
    assert base != encode_fields("s", "t", "a", "bc", None, None)  # bytes moved across a field boundary
    assert encode_fields("s", "t", "a", None, None, None) != encode_fields("s", "t", "a", "", None, None)
    assert encode_fields("s", "t", "a", None, "x", None) != encode_fields("s", "t", "a", None, None, "x")
    assert encode_fields("é", "t", "a", None, None, None) != encode_fields("e\u0301", "t", "a", None, None, None)
    # the payload is the rest of the hashed bytes: moving bytes between the last field and it changes the hash
    h1 = link_hash(b"\0" * 32, 1, 1, 0, 1, encode_fields("s", "t", "a", None, None, "x"), b"{}")
    h2 = link_hash(b"\0" * 32, 1, 1, 0, 1, encode_fields("s", "t", "a", None, None, "x{"), b"}")
    assert h1 != h2


def test_verify_detects_bytes_moved_between_fields_and_null_made_empty(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    async def build() -> None:
        store = await SQLiteEventStore.async_open(path)
        await store.async_append("vm-1", [NewEvent("vm.x", {"a": 1}, actor="ab")], command_id="c")
        await store.async_append("vm-1", [NewEvent("vm.x", {"a": 2}, actor="sys")])
        await store.async_close()

    asyncio.run(build())
    assert verify(path).exit_code == 0
    for n, sql in enumerate(
        (
            "UPDATE events SET actor = 'a', command_id = 'bc' WHERE position = 1",
            "UPDATE events SET causation_id = '' WHERE position = 2",
            "UPDATE events SET payload = CAST('{\"a\":2} ' AS BLOB) WHERE position = 2",
        )
    ):
        copy = drop_triggers_copy(path, tmp_path / f"copy-{n}.db")
        conn = sqlite3.connect(copy)
        conn.execute(sql)
        conn.commit()
        conn.close()
        r = verify(copy)
        assert r.exit_code == 1 and r.issues[0].kind == "hash_mismatch", (sql, r.render())
