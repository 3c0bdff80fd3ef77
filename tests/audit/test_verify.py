"""moldd-audit verify and checkpoint on a real log written by a real daemon driving real VMs: an intact log
verifies; each kind of tampering an attacker holding the file can do is detected, at the right position."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from events.chain import encode_fields, genesis_hash, link_hash
from moldd.cli.audit import main as audit
from tests.audit.conftest import RecordedLog

pytestmark = pytest.mark.libvirt

Tamper = Callable[[], tuple[Path, sqlite3.Connection]]


def run_verify(capsys: Any, db: Path, rec: RecordedLog | None = None) -> tuple[int, dict[str, Any]]:
    argv = ["verify", str(db), "--json"]
    if rec is not None:
        argv += ["--checkpoints", str(rec.checkpoints), "--public-key", str(rec.public_key)]
    capsys.readouterr()
    code = audit(argv)
    return code, json.loads(capsys.readouterr().out)


def last_position(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT max(position) FROM events").fetchone()[0])


def test_intact_real_log_verifies_with_its_checkpoints(recorded_log: RecordedLog, capsys: Any) -> None:
    code, report = run_verify(capsys, recorded_log.db, recorded_log)
    assert code == 0, report
    assert report["status"] == "intact" and report["first_bad_position"] is None
    assert report["events_checked"] == report["last_position"] > 20
    # the daemon sealed the log on its schedule, and `moldd-audit checkpoint` sealed the final head
    assert recorded_log.daemon_checkpoint_lines >= 1
    assert report["checkpoints_valid"] == report["checkpoints_checked"] > recorded_log.daemon_checkpoint_lines
    assert report["newest_checkpoint_position"] == report["last_position"]
    assert report["unsealed_tail"] == 0
    assert not [w for w in report["warnings"] if w["kind"] == "unknown_event_type"]


def test_verify_text_output_and_exit_code(recorded_log: RecordedLog, capsys: Any) -> None:
    assert audit(["verify", str(recorded_log.db)]) == 0
    out = capsys.readouterr().out
    assert "RESULT: INTACT (exit 0)" in out and "no checkpoints given" in out


def test_edited_payload_byte_is_detected_at_its_position(tampered_copy: Tamper, capsys: Any) -> None:
    db, conn = tampered_copy()
    pos, payload = conn.execute(
        "SELECT position, payload FROM events WHERE event_type = 'vm.stop.requested' LIMIT 1"
    ).fetchone()
    forged = bytes(payload).replace(b"true", b"fals", 1) if b"true" in payload else bytes(payload)[:-1] + b" "
    assert forged != bytes(payload)
    conn.execute("UPDATE events SET payload = ? WHERE position = ?", (forged, pos))
    conn.close()
    code, report = run_verify(capsys, db)
    assert code == 1
    assert report["first_bad_position"] == pos and report["reason"].startswith("hash_mismatch")


def test_deleted_row_is_detected(tampered_copy: Tamper, capsys: Any) -> None:
    db, conn = tampered_copy()
    pos = conn.execute(
        "SELECT position FROM events WHERE event_type = 'vm.destroy.requested' LIMIT 1"
    ).fetchone()[0]
    conn.execute("DELETE FROM events WHERE position = ?", (pos,))
    conn.close()
    code, report = run_verify(capsys, db)
    assert code == 1
    assert report["first_bad_position"] == pos
    kinds = {i["kind"] for i in report["issues"]}
    assert {"position_gap", "broken_link", "stream_version_gap"} <= kinds


def test_swapped_rows_are_detected(tampered_copy: Tamper, capsys: Any) -> None:
    db, conn = tampered_copy()
    rows = conn.execute("SELECT * FROM events WHERE position IN (10, 11) ORDER BY position").fetchall()
    conn.execute("DELETE FROM events WHERE position IN (10, 11)")
    a, b = rows
    conn.execute(f"INSERT INTO events VALUES ({','.join('?' * len(a))})", (10, *b[1:]))
    conn.execute(f"INSERT INTO events VALUES ({','.join('?' * len(a))})", (11, *a[1:]))
    conn.close()
    code, report = run_verify(capsys, db)
    assert code == 1 and report["first_bad_position"] == 10


def test_truncated_tail_is_detected_only_with_the_checkpoints(
    recorded_log: RecordedLog, tampered_copy: Tamper, capsys: Any
) -> None:
    db, conn = tampered_copy()
    last = last_position(conn)
    conn.execute("DELETE FROM events WHERE position > ?", (last - 5,))
    # the sealed snapshot of the cut tail would give it away: snapshots are disposable, the attacker drops it
    assert run_verify(capsys, db)[1]["reason"].startswith("snapshot_forged")
    conn.execute("DELETE FROM snapshots")
    conn.close()
    # the chain alone is consistent: a cut log looks intact without the checkpoints ...
    code, report = run_verify(capsys, db)
    assert code == 0, report
    # ... the signed checkpoint of the full log says otherwise
    code, report = run_verify(capsys, db, recorded_log)
    assert code == 1
    assert report["first_bad_position"] == last - 4 and report["reason"].startswith("truncated")


def test_wholesale_rewrite_without_the_key_is_detected_by_the_checkpoints(
    recorded_log: RecordedLog, tampered_copy: Tamper, capsys: Any
) -> None:
    """The attacker changes who stopped the VM and recomputes every hash from the genesis: the chain is
    consistent again, but not the one the daemon signed."""
    db, conn = tampered_copy()
    log_id = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]
    target = conn.execute("SELECT position FROM events WHERE event_type = 'vm.stop.requested'").fetchone()[0]
    rows = conn.execute(
        "SELECT position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
        "causation_id, correlation_id, payload FROM events ORDER BY position"
    ).fetchall()
    prev = genesis_hash(log_id)
    for pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload in rows:
        if pos == target:
            actor = "uid=4242(mallory) gid=4242 pid=1"
        fields = encode_fields(sid, et, actor, cid, caus, corr)
        h = link_hash(prev, pos, sv, ts, schv, fields, bytes(payload))
        conn.execute(
            "UPDATE events SET actor = ?, prev_hash = ?, hash = ? WHERE position = ?", (actor, prev, h, pos)
        )
        prev = h
    conn.execute("DELETE FROM snapshots")  # its head hash is stale now: dropped (snapshots are disposable)
    conn.close()
    from events import verify as chain_verify

    assert chain_verify(db).exit_code == 0, "a consistent rewrite passes the chain check: that is why checkpoints exist"
    # moldd-audit also re-folds the log: the daemon's snapshot seals no longer match the rewritten history
    code, report = run_verify(capsys, db)
    assert code == 1 and report["reason"].startswith("seal_forged"), report
    code, report = run_verify(capsys, db, recorded_log)
    assert code == 1
    assert report["reason"].startswith("rewritten")
    assert report["first_bad_position"] <= last_position(sqlite3.connect(db))


def test_forged_checkpoint_line_is_detected(recorded_log: RecordedLog, tmp_path: Path, capsys: Any) -> None:
    cps = tmp_path / "cps.jsonl"
    lines = recorded_log.checkpoints.read_text().splitlines()
    forged = json.loads(lines[-1]) | {"position": 1}
    cps.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    code, report = run_verify(
        capsys,
        recorded_log.db,
        RecordedLog(
            recorded_log.root, recorded_log.db, cps, recorded_log.public_key, recorded_log.private_key
        ),
    )
    assert code == 1 and any(i["kind"] == "checkpoint_invalid" for i in report["issues"])


def test_checkpoint_refuses_to_seal_a_tampered_log(
    recorded_log: RecordedLog, tampered_copy: Tamper, tmp_path: Path, capsys: Any
) -> None:
    db, conn = tampered_copy()
    conn.execute("UPDATE events SET actor = 'someone else' WHERE position = 3")
    conn.close()
    out = tmp_path / "cps.jsonl"
    out.write_text(recorded_log.checkpoints.read_text())
    before = out.read_text()
    code = audit(["checkpoint", str(db), "--key", str(recorded_log.private_key), "--out", str(out)])
    assert code == 1
    assert "refusing to sign" in capsys.readouterr().err
    assert out.read_text() == before
