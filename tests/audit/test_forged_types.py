"""A forged row whose columns have the wrong SQLite types is refused with an AuditError naming its position (an
explicit check, not an assert that ``python -O`` would drop), and nothing from it on is used."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from events import NewEvent, SQLiteEventStore
from moldd.audit.errors import AuditError
from moldd.audit.log import iter_events, open_log
from tests.audit.conftest import drop_triggers


async def _write(db: Path) -> None:
    store = await SQLiteEventStore.async_open(db)
    try:
        desc = {"name": "h1", "uri": "test:///default", "cluster": "c1", "max_vms": 4}
        await store.async_append("host-h1", [NewEvent("host.registered", desc) for _ in range(3)])
    finally:
        await store.async_close()


@pytest.mark.parametrize(
    ("column", "value"), [("schema_version", "one"), ("event_type", b"vm.created"), ("recorded_at", "yesterday")]
)
def test_a_column_of_the_wrong_type_is_an_audit_error(tmp_path: Path, column: str, value: object) -> None:
    db = tmp_path / "log.db"
    asyncio.run(_write(db))
    conn = drop_triggers(db)
    conn.execute(f"UPDATE events SET {column} = ? WHERE position = 2", (value,))
    conn.close()
    seen: list[int] = []
    with open_log(db) as log, pytest.raises(AuditError, match="position 2: a column of the row has the wrong type"):
        for ev in iter_events(log):
            seen.append(ev.position)
    assert seen == [1]  # the forged row and what follows it are not used
