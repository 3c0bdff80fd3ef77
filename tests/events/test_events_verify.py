from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from events import NewEvent, SQLiteEventStore, Upcasters, verify
from events.checkpoint import checkpoint_db, generate_keys, load_checkpoints
from tests.events.conftest import drop_triggers_copy

N_EVENTS = 30
TEXT_COLS = ["stream_id", "event_type", "actor"]
BLOB_COLS = ["payload", "prev_hash", "hash"]
INT_COLS = ["stream_version", "schema_version", "recorded_at"]


@pytest.fixture(scope="module")
def sealed_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A 30-event log over 3 streams, a key pair, and a checkpoint at the head."""
    d = tmp_path_factory.mktemp("sealed")
    path = d / "log.db"

    async def build() -> None:
        store = await SQLiteEventStore.async_open(path)
        for i in range(N_EVENTS):
            await store.async_append(f"vm-{i % 3}", [NewEvent("vm.thing", {"i": i, "s": "é" * (i % 4)})],
                                     command_id=f"cmd-{i}")
        await store.async_close()

    asyncio.run(build())
    priv, pub = generate_keys(d / "keys")
    cps = d / "checkpoints.jsonl"
    checkpoint_db(path, priv, cps)
    return path, priv, pub, cps


def attacker_copy(src: Path, tmp: Path) -> Path:
    dst = tmp / f"copy-{os.urandom(4).hex()}.db"
    return drop_triggers_copy(src, dst)


def tamper(src: Path, tmp: Path, *statements: tuple[str, tuple[object, ...]]) -> Path:
    """An attacker's copy of `src` with the statements applied (a UNIQUE collision skips the example)."""
    copy = attacker_copy(src, tmp)
    conn = sqlite3.connect(copy)
    try:
        for sql, params in statements:
            conn.execute(sql, params)
    except sqlite3.IntegrityError:  # the edit collides with UNIQUE(stream_id, stream_version): not possible
        conn.close()
        copy.unlink()
        assume(False)
    conn.commit()
    conn.close()
    return copy


def test_intact_log_verifies_with_its_checkpoint(sealed_log: tuple[Path, Path, Path, Path]) -> None:
    path, _, pub, cps = sealed_log
    r = verify(path, checkpoints=cps, public_key=pub)
    assert r.exit_code == 0, r.render()
    assert (r.first_position, r.last_position, r.events_checked) == (1, N_EVENTS, N_EVENTS)
    assert r.unsealed_tail == 0 and r.checkpoints_valid == 1


@settings(database=None, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.integers(1, N_EVENTS),
    column=st.sampled_from(TEXT_COLS + BLOB_COLS),
    offset=st.integers(0, 10_000),
    delta=st.integers(1, 255),
)
def test_any_single_byte_edit_is_detected_at_its_position(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, position: int, column: str, offset: int, delta: int
) -> None:
    path, _, pub, cps = sealed_log
    copy = attacker_copy(path, tmp_path)
    conn = sqlite3.connect(copy)
    conn.text_factory = bytes
    (value,) = conn.execute(f"SELECT CAST({column} AS BLOB) FROM events WHERE position = ?", (position,)).fetchone()
    data = bytearray(value)
    i = offset % len(data)
    data[i] = (data[i] + delta) % 256
    try:
        if column in TEXT_COLS:
            conn.execute(f"UPDATE events SET {column} = CAST(? AS TEXT) WHERE position = ?", (bytes(data), position))
        else:
            conn.execute(f"UPDATE events SET {column} = ? WHERE position = ?", (bytes(data), position))
    except sqlite3.IntegrityError:  # the edit collides with UNIQUE(stream_id, stream_version): not possible
        conn.close()
        assume(False)
    conn.commit()
    conn.close()
    r = verify(copy, checkpoints=cps, public_key=pub)
    assert r.exit_code == 1, r.render()
    assert r.first_bad_position == position, r.render()
    copy.unlink()


@settings(database=None, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(1, N_EVENTS), column=st.sampled_from(INT_COLS), delta=st.integers(1, 1000))
def test_integer_field_edits_are_detected_at_their_position(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, position: int, column: str, delta: int
) -> None:
    copy = tamper(sealed_log[0], tmp_path,
                  (f"UPDATE events SET {column} = {column} + ? WHERE position = ?", (delta, position)))
    r = verify(copy)
    assert r.exit_code == 1 and r.first_bad_position == position, r.render()
    copy.unlink()


@settings(database=None, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(1, N_EVENTS - 1))
def test_a_deleted_row_is_detected_at_its_position(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, position: int
) -> None:
    copy = tamper(sealed_log[0], tmp_path, ("DELETE FROM events WHERE position = ?", (position,)))
    r = verify(copy)
    assert r.exit_code == 1 and r.first_bad_position == position, r.render()
    copy.unlink()


@settings(database=None, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.integers(1, N_EVENTS), b=st.integers(1, N_EVENTS))
def test_swapped_rows_are_detected_at_the_first_of_them(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, a: int, b: int
) -> None:
    if a == b:
        return
    copy = tamper(
        sealed_log[0],
        tmp_path,
        ("UPDATE events SET position = -1 WHERE position = ?", (a,)),
        ("UPDATE events SET position = ? WHERE position = ?", (a, b)),
        ("UPDATE events SET position = ? WHERE position = -1", (b,)),
    )
    r = verify(copy)
    assert r.exit_code == 1 and r.first_bad_position == min(a, b), r.render()
    copy.unlink()


@settings(database=None, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, N_EVENTS - 1))
def test_truncation_is_detected_against_the_checkpoint(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, keep: int
) -> None:
    path, _, pub, cps = sealed_log
    copy = tamper(path, tmp_path, ("DELETE FROM events WHERE position > ?", (keep,)))
    assert verify(copy).exit_code == 0  # the chain alone cannot see a clean truncation
    r = verify(copy, checkpoints=cps, public_key=pub)
    assert r.exit_code == 1 and r.first_bad_position == keep + 1, r.render()
    assert r.issues[0].kind == "truncated"
    copy.unlink()


def test_wholesale_rewrite_is_detected_by_the_checkpoint(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    path, _, pub, cps = sealed_log
    rewritten = tmp_path / "rewritten.db"
    log_id = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0]

    async def build() -> None:  # same log id, a different history, a perfectly valid chain
        store = await SQLiteEventStore.async_open(rewritten)
        await store.async_close()
        conn = drop_triggers_copy(rewritten, tmp_path / "tmp.db")
        c = sqlite3.connect(conn)
        c.execute("UPDATE meta SET value = ? WHERE key = 'log_id'", (log_id,))
        c.commit()
        c.close()
        shutil.move(str(tmp_path / "tmp.db"), rewritten)
        store = await SQLiteEventStore.async_open(rewritten)
        for i in range(N_EVENTS + 5):
            await store.async_append("vm-0", [NewEvent("vm.thing", {"i": -i})])
        await store.async_close()

    asyncio.run(build())
    assert verify(rewritten).exit_code == 0
    r = verify(rewritten, checkpoints=cps, public_key=pub)
    assert r.exit_code == 1 and r.issues[0].kind == "rewritten" and r.first_bad_position == N_EVENTS


def test_forged_checkpoint_signature_is_reported(sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    path, _, pub, cps = sealed_log
    line = json.loads(cps.read_text().splitlines()[0])
    line["position"] = 1
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps(line) + "\n")
    r = verify(path, checkpoints=forged, public_key=pub)
    assert r.exit_code == 1 and r.issues[0].kind == "checkpoint_invalid"


def test_unknown_types_and_future_versions_are_warned(sealed_log: tuple[Path, Path, Path, Path]) -> None:
    up = Upcasters()
    up.declare("other.type", 1)
    r = verify(sealed_log[0], known=up)
    assert r.exit_code == 0 and r.warnings[0].kind == "unknown_event_type" and r.warnings[0].position == 1
    r = verify(sealed_log[0], known={"vm.thing": 0})
    assert r.warnings[0].kind == "schema_version_from_future"


def test_time_running_backwards_is_reported(sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    copy = tamper(sealed_log[0], tmp_path, ("UPDATE events SET recorded_at = recorded_at - 10000000 WHERE position = 7", ()))
    kinds = {i.kind for i in verify(copy).issues if i.position == 7}
    assert {"hash_mismatch", "time_backwards"} <= kinds


def test_unsealed_tail_is_reported(sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    path, _, pub, cps = sealed_log
    copy = tmp_path / "grown.db"
    drop_triggers_copy(path, copy)

    async def grow() -> None:
        store = await SQLiteEventStore.async_open(copy)
        await store.async_append("vm-9", [NewEvent("vm.thing", {}), NewEvent("vm.thing", {})])
        await store.async_close()

    asyncio.run(grow())
    r = verify(copy, checkpoints=cps, public_key=pub)
    assert r.exit_code == 0 and r.unsealed_tail == 2
    assert "unsealed tail: 2 events" in r.render()


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path: Path) -> None:
    priv, pub = generate_keys(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in pub.read_bytes()


def test_checkpoints_round_trip(sealed_log: tuple[Path, Path, Path, Path]) -> None:
    _, _, pub, cps = sealed_log
    (cp,) = load_checkpoints(cps, pub)
    assert cp.position == N_EVENTS and len(cp.head_hash) == 64


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "events", *args], capture_output=True, text=True, cwd=root,
                          timeout=60)


def test_cli_exit_codes_and_output(sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    path, priv, pub, cps = sealed_log
    ok = run_cli("verify", str(path), "--checkpoints", str(cps), "--public-key", str(pub))
    assert ok.returncode == 0 and "checked positions 1..30" in ok.stdout and "INTACT" in ok.stdout
    copy = tamper(path, tmp_path, ("UPDATE events SET payload = CAST('{\"i\":99}' AS BLOB) WHERE position = 12", ()))
    bad = run_cli("verify", str(copy), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["first_bad_position"] == 12 and report["status"] == "tampered"
    text = run_cli("verify", str(copy))
    assert "FIRST BAD POSITION: 12" in text.stdout and "Traceback" not in text.stderr
    for args in (("verify", str(tmp_path / "missing.db")),
                 ("verify", str(path), "--checkpoints", str(cps), "--public-key", str(priv.parent / "nope")),
                 ("verify", str(cps))):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, (args, r.stdout, r.stderr)


def test_cli_keygen_and_checkpoint(sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    path = sealed_log[0]
    assert run_cli("keygen", str(tmp_path / "keys")).returncode == 0
    key = tmp_path / "keys" / "checkpoint-ed25519.key"
    out = tmp_path / "cps.jsonl"
    r = run_cli("checkpoint", str(path), "--key", str(key), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert run_cli("checkpoint", str(path), "--key", str(key), "--out", str(out)).returncode == 0
    assert len(out.read_text().splitlines()) == 2
    pub = tmp_path / "keys" / "checkpoint-ed25519.pub"
    assert verify(path, checkpoints=out, public_key=pub).checkpoints_valid == 2


@pytest.mark.parametrize("position", [0, -3])
def test_a_row_inserted_before_position_1_is_detected(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path, position: int
) -> None:
    # the store serves such a row (read_stream / read_since select by stream and time, not by position)
    copy = tamper(
        sealed_log[0],
        tmp_path,
        (
            "INSERT INTO events SELECT ?, stream_id, 999, event_type, schema_version, recorded_at, actor, NULL, "
            "NULL, NULL, payload, prev_hash, hash FROM events WHERE position = 5",
            (position,),
        ),
    )
    r = verify(copy)
    assert r.exit_code == 1 and r.first_bad_position == position, r.render()
    assert r.issues[0].kind == "position_out_of_range"


def test_malformed_checkpoint_lines_are_reported_one_by_one(
    sealed_log: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    path, _, pub, cps = sealed_log
    good = cps.read_bytes().splitlines()[0]
    as_string = json.loads(good)
    as_string["position"] = str(as_string["position"])
    bad_lines = [
        b'{"log_id": "x", "position": Infinity, "head_hash": "00", "time": "t", "signature": "00"}',
        b"[1, 2, 3]",
        b'"just a string"',
        b"[" * 100_000,
        b"\xff\xfe not utf-8",
        b'{"log_id": "x"}',
        json.dumps(as_string).encode(),
    ]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join([good, *bad_lines, b""]))
    r = verify(path, checkpoints=mixed, public_key=pub)  # never raises
    assert r.status == "tampered" and r.exit_code == 1, r.render()
    assert r.checkpoints_valid == 1 and r.checkpoints_checked == 1 + len(bad_lines)
    bad = [i.message for i in r.issues if i.kind == "checkpoint_invalid"]
    assert [m.split(":")[0] for m in bad] == [f"checkpoint line {n}" for n in range(2, 2 + len(bad_lines))]
    cli = run_cli("verify", str(path), "--checkpoints", str(mixed), "--public-key", str(pub))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr + cli.stdout, cli.stderr
