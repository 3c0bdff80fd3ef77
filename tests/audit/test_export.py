"""moldd-audit export: JSON lines and CSV round-trip to the stored rows, byte for byte (the chain can be
re-checked from an export), and CSV escaping survives commas, quotes, line breaks and non-ASCII text."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from events import NewEvent, SQLiteEventStore
from events.chain import encode_fields, genesis_hash, link_hash
from moldd.audit.export import FIELDS
from moldd.cli.audit import main as audit
from tests.audit.conftest import RecordedLog


def _stored(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT * FROM events ORDER BY position").fetchall()
    finally:
        conn.close()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _recheck_chain(log_id: str, records: list[dict[str, Any]], payload_bytes: Any) -> None:
    prev = genesis_hash(log_id)
    for r in records:
        assert r["prev_hash"] == prev.hex()
        from datetime import datetime

        from events.envelope import datetime_to_us

        ts = datetime_to_us(datetime.fromisoformat(r["recorded_at"].replace("Z", "+00:00")))
        fields = encode_fields(r["stream"], r["type"], r["actor"], r["command_id"] or None,
                               r["causation_id"] or None, r["correlation_id"] or None)  # fmt: skip
        h = link_hash(prev, int(r["position"]), int(r["stream_version"]), ts, int(r["schema_version"]), fields,
                      payload_bytes(r))  # fmt: skip
        assert h.hex() == r["hash"], r["position"]
        prev = h


@pytest.mark.libvirt
def test_jsonl_export_round_trips_a_real_log(recorded_log: RecordedLog, tmp_path: Path) -> None:
    out = tmp_path / "log.jsonl"
    assert audit(["export", str(recorded_log.db), "--format", "jsonl", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    rows = _stored(recorded_log.db)
    assert len(records) == len(rows)
    for rec, row in zip(records, rows, strict=True):
        assert list(rec) == list(FIELDS)
        assert rec["position"] == row[0] and rec["stream"] == row[1] and rec["type"] == row[3]
        assert rec["hash"] == bytes(row[12]).hex() and rec["prev_hash"] == bytes(row[11]).hex()
        assert rec["payload"] == json.loads(row[10]) and rec["recorded_at"].endswith("Z")
    log_id = (
        sqlite3.connect(recorded_log.db).execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0]
    )
    from events.canonical import canonical_json

    _recheck_chain(log_id, records, lambda r: canonical_json(r["payload"]))


@pytest.mark.libvirt
def test_csv_export_of_a_range_round_trips(recorded_log: RecordedLog, tmp_path: Path) -> None:
    out = tmp_path / "log.csv"
    assert (
        audit(
            [
                "export",
                str(recorded_log.db),
                "--from",
                "5",
                "--to",
                "12",
                "--format",
                "csv",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes().startswith(b"position,recorded_at,stream,")
    assert b"\r\n" in out.read_bytes()
    records = _read_csv(out)
    rows = {r[0]: r for r in _stored(recorded_log.db)}
    assert [int(r["position"]) for r in records] == list(range(5, 13))
    for rec in records:
        row = rows[int(rec["position"])]
        assert rec["payload"].encode() == bytes(row[10])  # exactly the stored (hashed) bytes
        assert rec["command_id"] == (row[7] or "") and rec["actor"] == row[6]


async def test_csv_escaping_of_commas_quotes_newlines_and_unicode(tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "odd.db"
    store = await SQLiteEventStore.async_open(db)
    nasty = 'a,b "quoted" \r\n second line; é ü 日本 \t tab'
    try:
        await store.async_append(
            "vm-x",
            [NewEvent("vm.updated", {"changes": {"description": nasty}}, actor='uid=1("o,dd") gid=1 pid=2')],
        )
        await store.async_append("group-g", [NewEvent("group.created", {"name": "g", "description": "\n"})])
        log_id = store.log_id
    finally:
        await store.async_close()
    out = tmp_path / "odd.csv"
    assert audit(["export", str(db), "--format", "csv", "--output", str(out)]) == 0
    records = _read_csv(out)
    assert len(records) == 2
    assert json.loads(records[0]["payload"])["changes"]["description"] == nasty
    assert records[0]["actor"] == 'uid=1("o,dd") gid=1 pid=2'
    assert records[0]["command_id"] == "" and records[1]["payload"] == '{"description":"\\n","name":"g"}'
    _recheck_chain(log_id, records, lambda r: r["payload"].encode())
    # the JSON lines of the same log to stdout
    assert audit(["export", str(db), "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["payload"]["changes"]["description"] == nasty
    assert json.loads(lines[0])["command_id"] is None
