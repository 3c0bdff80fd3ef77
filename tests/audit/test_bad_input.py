"""Bad input gets one clear line on stderr and exit code 2 (could not check), never a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from events import NewEvent, SQLiteEventStore
from moldd.cli.audit import main as audit


def one_line_error(capsys: Any, argv: list[str], *, expect: str) -> str:
    capsys.readouterr()
    assert audit(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moldd-audit"), err
    assert "Traceback" not in err and expect in err, err
    return err


@pytest.fixture
async def small_log(tmp_path: Path) -> Path:
    db = tmp_path / "small.db"
    store = await SQLiteEventStore.async_open(db)
    try:
        await store.async_append("group-g", [NewEvent("group.created", {"name": "g"})])
        await store.async_append("group-h", [NewEvent("group.created", {"name": "h"})])
    finally:
        await store.async_close()
    return db


@pytest.fixture
async def future_log(tmp_path: Path) -> Path:
    """A valid chain written by a newer moldd: a known type at a schema version this moldd does not know."""
    db = tmp_path / "future.db"
    store = await SQLiteEventStore.async_open(db)
    try:
        await store.async_append("group-g", [NewEvent("group.created", {"name": "g"})])
        await store.async_append("group-g", [NewEvent("group.created", {"label": "g"}, schema_version=7)])
    finally:
        await store.async_close()
    return db


@pytest.fixture
def not_a_log(tmp_path: Path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text("these are not the events you are looking for\n" * 50)
    return p


@pytest.fixture
def other_sqlite(tmp_path: Path) -> Path:
    p = tmp_path / "other.db"
    conn = sqlite3.connect(p)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    return p


@pytest.mark.parametrize(
    "command", [["verify"], ["state"], ["history", "-", "vm-1"], ["export", "--format", "csv"]]
)
@pytest.mark.parametrize("kind", ["missing", "text", "sqlite"])
def test_not_a_log_or_missing_file(
    command: list[str], kind: str, tmp_path: Path, not_a_log: Path, other_sqlite: Path, capsys: Any
) -> None:
    path = {"missing": tmp_path / "nope.db", "text": not_a_log, "sqlite": other_sqlite}[kind]
    argv = [command[0], str(path), *[a for a in command[1:] if a != "-"]]
    if command[0] == "history":
        argv = ["history", str(path), "vm-1"]
    one_line_error(capsys, argv, expect=str(path.name))
    if kind == "missing":
        assert not path.exists(), "read-only: the audit never creates a file"


def test_log_from_the_future(future_log: Path, capsys: Any) -> None:
    for argv in (["verify", str(future_log)], ["state", str(future_log)], ["history", str(future_log), "x"]):
        capsys.readouterr()
        assert audit(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        if argv[0] != "history":
            assert "schema version 7" in err and "newer moldd" in err, err


def test_missing_or_invalid_key(small_log: Path, tmp_path: Path, capsys: Any) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    cps = tmp_path / "cps.jsonl"
    cps.write_text("")
    one_line_error(capsys, ["verify", str(small_log), "--checkpoints", str(cps), "--public-key", str(tmp_path / "k")],
                   expect="public key")  # fmt: skip
    one_line_error(capsys, ["verify", str(small_log), "--checkpoints", str(cps), "--public-key", str(garbage)],
                   expect="garbage.pem")  # fmt: skip
    one_line_error(capsys, ["verify", str(small_log), "--checkpoints", str(cps)], expect="--public-key")
    one_line_error(
        capsys, ["checkpoint", str(small_log), "--key", str(garbage), "--out", str(cps)], expect="garbage.pem"
    )
    one_line_error(capsys, ["checkpoint", str(small_log), "--key", str(tmp_path / "none.key"), "--out", str(cps)],
                   expect="none.key")  # fmt: skip
    assert cps.read_text() == ""


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path, capsys: Any) -> None:
    assert audit(["keygen", str(tmp_path / "keys")]) == 0
    key = (tmp_path / "keys" / "checkpoint.key").read_bytes()
    assert (tmp_path / "keys" / "checkpoint.key").stat().st_mode & 0o777 == 0o600
    one_line_error(capsys, ["keygen", str(tmp_path / "keys")], expect="refusing to overwrite")
    assert (tmp_path / "keys" / "checkpoint.key").read_bytes() == key
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["checkpoint.key", "checkpoint.pub"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["state", "--at-position", "abc"], "not a whole number"),
        (["state", "--at-position", "-3"], "negative"),
        (["state", "--at-position", "99"], "beyond the end of the log (last position 2)"),
        (["state", "--at-time", "yesterday"], "not an ISO 8601 time"),
        (["state", "--at-time", "2024-13-45T00:00:00Z"], "not an ISO 8601 time"),
        (["state", "--at-position", "1", "--at-time", "2024-01-01"], "not allowed with"),
        (["history", "vm-nobody"], "no VM 'vm-nobody'"),
        (["export", "--format", "csv", "--from", "0"], "positions start at 1"),
        (["export", "--format", "csv", "--from", "x"], "not a whole number"),
        (["export", "--format", "csv", "--from", "2", "--to", "1"], "before --from"),
        (["export", "--format", "xml"], "invalid choice"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_position_time_or_argument(small_log: Path, args: list[str], expect: str, capsys: Any) -> None:
    argv = [args[0], str(small_log), *args[1:]] if args[0] != "bogus" else args
    one_line_error(capsys, argv, expect=expect)


def test_state_at_position_on_a_small_log(small_log: Path, capsys: Any) -> None:
    assert audit(["state", str(small_log), "--at-position", "1", "--json"]) == 0
    assert '"name": "g"' in capsys.readouterr().out
    assert audit(["state", str(small_log), "--at-position", "0"]) == 0


def test_module_entry_point_runs_without_a_traceback(small_log: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "moldd.cli.audit", "verify", str(small_log)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "RESULT: INTACT" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "moldd.cli.audit", "state", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
