"""Attacks on the evidence around the chain (issue 10): checkpoint lines deleted or emptied, a damaged -wal,
audit tools that would write next to their input, a log from a newer version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from events import NewEvent, SQLiteEventStore, verify
from events.checkpoint import checkpoint_db, generate_keys, load_private_key, sign_checkpoint
from moldd.cli.audit import main as audit_main

ROOT = Path(__file__).resolve().parents[2]


def run_events(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "events", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


async def _append(store: SQLiteEventStore, n: int) -> None:
    for i in range(n):
        await store.async_append(f"vm-{i % 3}", [NewEvent("vm.thing", {"i": i, "pad": "x" * 300})])


def build_log(path: Path, n: int = 20) -> None:
    async def go() -> None:
        store = await SQLiteEventStore.async_open(path)
        await _append(store, n)
        await store.async_close()

    asyncio.run(go())


def live_copy(dst_dir: Path, n: int) -> Path:
    """A log copied (db + -wal) while its writer still has it open: its events are in the -wal."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    src = dst_dir.parent / f"live-{os.urandom(3).hex()}.db"

    async def go() -> None:
        store = await SQLiteEventStore.async_open(src)
        await _append(store, n)
        shutil.copyfile(str(src) + "-wal", dst_dir / "log.db-wal")
        shutil.copyfile(src, dst_dir / "log.db")
        await store.async_close()

    asyncio.run(go())
    return dst_dir / "log.db"


def snapshot_dir(d: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(d.iterdir())
    }


# ---- 5. numbered, chained checkpoints ---------------------------------------------------------------------
def test_checkpoints_are_numbered_and_chained_and_gaps_and_absence_are_reported(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_log(db)
    priv, pub = generate_keys(tmp_path / "keys")
    cps = tmp_path / "cps.jsonl"
    for _ in range(4):
        checkpoint_db(db, priv, cps)
    lines = [json.loads(x) for x in cps.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3, 4] and lines[0]["prev"] == ""
    r = verify(db, checkpoints=cps, public_key=pub)
    assert r.exit_code == 0 and r.checkpoints_checked == 4 and r.newest_checkpoint_seq == 4
    assert "checkpoints: 4 checked" in r.render() and "seals position 20" in r.render()

    gap = tmp_path / "gap.jsonl"
    text = cps.read_text().splitlines()
    gap.write_text("\n".join([text[0], text[2], text[3]]) + "\n")  # line #2 deleted
    r = verify(db, checkpoints=gap, public_key=pub)
    assert [w.kind for w in r.warnings] == ["checkpoint_gap"] and "#2..#2" in r.warnings[0].message
    assert "3 checked" in r.render()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = verify(db, checkpoints=empty, public_key=pub)
    assert [w.kind for w in r.warnings] == ["no_checkpoints"] and "0 checked" not in r.render()
    assert "none checked" in r.render() or "no checkpoint" in r.warnings[0].message
    assert "checkpoints: none checked" in verify(db).render()

    # a validly signed line that does not link to the one before it (a line replaced) is an issue
    head = sqlite3.connect(db).execute("SELECT hash FROM events WHERE position = 20").fetchone()[0]
    log_id = lines[0]["log_id"]
    rogue = sign_checkpoint(load_private_key(priv), log_id, 20, head, seq=5, prev="00" * 32)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(cps.read_text() + rogue.to_json() + "\n")
    r = verify(db, checkpoints=swapped, public_key=pub)
    assert r.exit_code == 1 and r.issues[0].kind == "checkpoint_chain_broken"


def test_the_checkpoints_file_is_created_0640_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_log(db, 3)
    priv, _ = generate_keys(tmp_path / "keys")
    old = os.umask(0)
    try:
        checkpoint_db(db, priv, tmp_path / "cps.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "cps.jsonl").stat().st_mode & 0o777 == 0o640
    assert db.stat().st_mode & 0o777 == 0o600


# ---- 6. a damaged -wal ---------------------------------------------------------------------------------------
def test_a_flipped_byte_in_the_wal_is_reported_not_taken_for_a_shorter_log(tmp_path: Path) -> None:
    db = live_copy(tmp_path / "evidence", 62)
    intact = verify(db)
    assert intact.exit_code == 0 and intact.last_position == 62 and intact.wal_frames > 20, intact.render()
    wal = Path(str(db) + "-wal")
    data = bytearray(wal.read_bytes())
    page = int.from_bytes(data[8:12], "big")
    frame = 27
    data[32 + frame * (24 + page) + 24 + 200] ^= 0x01
    wal.write_bytes(bytes(data))
    r = verify(db)
    assert r.last_position < 62  # SQLite drops every frame from the bad one on ...
    assert r.exit_code == 1 and any(i.kind == "wal_damaged" for i in r.issues), r.render()  # ... we say so
    assert r.wal_invalid_frames >= r.wal_frames - frame  # from the last commit before the bad frame on


# ---- 7. audit tools never write next to their input --------------------------------------------------------
def test_audit_tools_create_and_change_no_file_next_to_their_input(tmp_path: Path) -> None:
    db = live_copy(tmp_path / "evidence", 12)
    priv, _ = generate_keys(tmp_path / "keys")
    before = snapshot_dir(db.parent)
    assert set(before) == {"log.db", "log.db-wal"}
    out = tmp_path / "out"
    out.mkdir()
    assert verify(db).exit_code == 0
    assert run_events("verify", str(db)).returncode == 0
    assert run_events("checkpoint", str(db), "--key", str(priv), "--out", str(out / "cps.jsonl")).returncode == 0
    for argv in (
        ["verify", str(db)],
        ["state", str(db)],
        ["history", str(db), "vm-1"],
        ["export", str(db), "--format", "jsonl", "--output", str(out / "x.jsonl")],
        ["checkpoint", str(db), "--key", str(priv), "--out", str(out / "cps2.jsonl")],
    ):
        audit_main(argv)
    assert snapshot_dir(db.parent) == before


def test_an_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    db = live_copy(tmp_path / "evidence", 5)
    priv, _ = generate_keys(tmp_path / "keys")
    before = snapshot_dir(db.parent)
    for target in (db, Path(str(db) + "-wal"), db.parent / ".." / "evidence" / "log.db"):
        r = run_events("checkpoint", str(db), "--key", str(priv), "--out", str(target))
        assert r.returncode == 2 and "refusing" in r.stderr, r.stderr
        assert audit_main(["checkpoint", str(db), "--key", str(priv), "--out", str(target)]) == 2
        assert audit_main(["export", str(db), "--format", "csv", "--output", str(target)]) == 2
    assert snapshot_dir(db.parent) == before


# ---- 8. a log from a newer version ---------------------------------------------------------------------------
def test_a_log_of_a_newer_schema_version_is_refused_by_every_tool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "log.db"
    build_log(db, 3)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    priv, _ = generate_keys(tmp_path / "keys")
    r = run_events("verify", str(db))
    assert r.returncode == 2 and "schema version 99" in r.stdout + r.stderr
    r = run_events("checkpoint", str(db), "--key", str(priv), "--out", str(tmp_path / "c.jsonl"))
    assert r.returncode == 2 and not (tmp_path / "c.jsonl").exists()
    for argv in (
        ["verify", str(db)],
        ["state", str(db)],
        ["history", str(db), "vm-1"],
        ["export", str(db), "--format", "jsonl"],
        ["checkpoint", str(db), "--key", str(priv), "--out", str(tmp_path / "c2.jsonl"), "--no-verify"],
        ["checkpoint", str(db), "--key", str(priv), "--out", str(tmp_path / "c3.jsonl")],
    ):
        capsys.readouterr()
        assert audit_main(argv) == 2, argv
        assert "99" in capsys.readouterr().err, argv


def test_events_verify_says_it_did_not_check_event_types(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    build_log(db, 3)
    r = run_events("verify", str(db))
    assert r.returncode == 0 and "event types and schema versions: NOT checked" in r.stdout
    assert json.loads(run_events("verify", str(db), "--json").stdout)["types_checked"] is False
