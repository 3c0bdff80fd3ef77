"""The C scan of events.verify (events/_chainscan.c) against the pure-Python scan it accelerates.

The C scan never writes a report: it vouches for a log it found clean, and on anything else the Python scan reads
the log again and writes the report. So every forged row below must make the C scan stop (it detects what the
Python scan detects), and every report (text and JSON) and every verify_chain_range result or error must be the
same with and without it: at the start, the middle and the end of the log and at the edges of a checked range.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.loggen import generate
from events.chain import HEADER, TAG, genesis_hash
from events.checkpoint import checkpoint_db, generate_keys
from events.errors import LogIntegrityError
from tests.accelerators import required_accelerator
from tests.events.conftest import drop_triggers_copy

ev = importlib.import_module("events.verify")  # (the package's `verify` attribute is the function)
N = 1500
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A realistic 1,500-event log (bench/loggen.py), its public key and checkpoints at positions N/2 and N."""
    d = tmp_path_factory.mktemp("fast")
    path = d / "log.db"
    assert generate(path, vms=12, events=N) == N
    priv, pub = generate_keys(d / "keys")
    cps = d / "checkpoints.jsonl"
    half = drop_triggers_copy(path, d / "half.db")
    with sqlite3.connect(half) as conn:
        conn.execute("DELETE FROM events WHERE position > ?", (N // 2,))
    checkpoint_db(half, priv, cps)
    checkpoint_db(path, priv, cps)
    return path, pub, cps


@pytest.fixture(autouse=True)
def split_small_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify splits logs of SPLIT_AT rows or more in two ranges scanned at once: here, these small logs too, so
    the seam (the middle row, N // 2) is attacked like the start and the end."""
    monkeypatch.setattr(ev, "SPLIT_AT", 100)


def accelerator() -> Any:
    return required_accelerator(ev.ACCELERATOR, "EVENTS_VERIFY_PURE_PYTHON", "events._chainscan (the C scan)")


def both(monkeypatch: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    """fn() with the C scan, then with the pure-Python scan only."""
    fast = fn()
    with monkeypatch.context() as m:
        m.setattr(ev, "ACCELERATOR", None)
        slow = fn()
    return fast, slow


def c_verdict(path: Path) -> tuple[Any, ...]:
    """The C scan's own verdict over the whole log, as events.verify runs it."""
    conn = ev.open_readonly(path)
    try:
        log_id = ev.read_log_id(conn)
        assert conn.uri is not None
        out: tuple[Any, ...] = accelerator().scan(
            conn.uri, 1, 2**62, genesis_hash(log_id), -(2**63), TAG, [], True
        )
        return out
    finally:
        conn.close()


def fast_verdict(path: Path) -> bool:
    """Whether verify's C scan (split at the seam on two CPUs) vouches for the whole log."""
    conn = ev.open_readonly(path)
    try:
        st = ev._Scan(ev.read_log_id(conn), None, set())
        return bool(ev._fast_scan(conn, st))
    finally:
        conn.close()


def rechain(path: Path, start: int) -> None:
    """Recompute prev_hash/hash from `start` to the end over the bytes as stored (a chain-aware forger)."""
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    if start > 1:
        prev = conn.execute("SELECT hash FROM events WHERE position = ?", (start - 1,)).fetchone()[0]
    else:
        log_id = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0].decode()
        prev = genesis_hash(log_id)
    rows = conn.execute(
        f"SELECT {ev.COLUMNS} FROM events WHERE position >= ? ORDER BY position", (start,)
    ).fetchall()
    for pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, _, _ in rows:
        texts = (sid, et, actor, cid, caus, corr)
        header = HEADER.pack(pos, sv, ts, schv, *(-1 if t is None else len(t) for t in texts))
        h = hashlib.sha256(TAG + prev + header + b"".join(t or b"" for t in texts) + payload).digest()
        conn.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE position = ?", (prev, h, pos))
        prev = h
    conn.commit()
    conn.close()


# name -> (SQL run with the position as its parameter, rechain from that position after it)
EDITS: dict[str, tuple[str, bool]] = {
    "payload_byte": ("UPDATE events SET payload = payload || x'00' WHERE position = ?", False),
    "payload_edit_rechained": ("UPDATE events SET payload = payload || x'20' WHERE position = ?", True),
    "hash_forged": ("UPDATE events SET hash = randomblob(32) WHERE position = ?", False),
    "hash_short": ("UPDATE events SET hash = substr(hash, 1, 31) WHERE position = ?", False),
    "prev_hash_forged": ("UPDATE events SET prev_hash = zeroblob(32) WHERE position = ?", False),
    "position_moved": ("UPDATE events SET position = position + 1000000 WHERE position = ?", False),
    "deleted": ("DELETE FROM events WHERE position = ?", False),
    "stream_version": ("UPDATE events SET stream_version = stream_version + 1000 WHERE position = ?", False),
    "time_backwards": ("UPDATE events SET recorded_at = 0 WHERE position = ?", False),
    "schema_version_negative": ("UPDATE events SET schema_version = -1 WHERE position = ?", False),
    "schema_version_too_big": ("UPDATE events SET schema_version = 4294967296 WHERE position = ?", False),
    "payload_as_text": ("UPDATE events SET payload = CAST(payload AS TEXT) WHERE position = ?", False),
    "hash_as_text": ("UPDATE events SET hash = CAST(hash AS TEXT) WHERE position = ?", False),
    "prev_hash_as_text": ("UPDATE events SET prev_hash = CAST(prev_hash AS TEXT) WHERE position = ?", False),
    "stream_id_as_blob": ("UPDATE events SET stream_id = CAST(stream_id AS BLOB) WHERE position = ?", False),
    "actor_as_blob_rechained": ("UPDATE events SET actor = CAST(actor AS BLOB) WHERE position = ?", True),
    "command_id_as_blob": ("UPDATE events SET command_id = CAST('c' AS BLOB) WHERE position = ?", False),
    "command_id_as_int": ("UPDATE events SET command_id = 7 WHERE position = ?", False),
    "stream_version_real": (
        "UPDATE events SET stream_version = stream_version + 0.5 WHERE position = ?",
        False,
    ),
    "stream_version_text": ("UPDATE events SET stream_version = 'x' WHERE position = ?", False),
    "recorded_at_real": ("UPDATE events SET recorded_at = recorded_at + 0.5 WHERE position = ?", False),
    "null_vs_empty": (
        "UPDATE events SET causation_id = CASE WHEN causation_id IS NULL THEN '' ELSE NULL END WHERE position = ?",
        False,
    ),
    "stream_id_not_utf8": (
        "UPDATE events SET stream_id = CAST(x'ff' || CAST(stream_id AS BLOB) AS TEXT) WHERE position = ?",
        False,
    ),
    "actor_not_utf8_rechained": (
        "UPDATE events SET actor = CAST(x'ff41c0' AS TEXT) WHERE position = ?",
        True,
    ),
    "actor_with_nul_rechained": (
        "UPDATE events SET actor = CAST(x'610062' AS TEXT) WHERE position = ?",
        True,
    ),
    "event_type_renamed_rechained": ("UPDATE events SET event_type = 'vm.forged' WHERE position = ?", True),
    "row_before_position_1": (
        "INSERT INTO events SELECT 0, stream_id, stream_version + 100000, "
        + ev.COLUMNS.split(", ", 3)[3]
        + " FROM events WHERE position = ?",
        False,
    ),
}
# each of these edits is also tried with the chain recomputed after it ("<name>_rechained")
EDITS.update({f"{name}_rechained": (EDITS[name][0], True) for name in ("position_moved", "deleted", "stream_version", "time_backwards", "null_vs_empty", "stream_id_not_utf8")})
# What the Python row scan reports (other checks report rows before position 1, checkpoints, WAL, snapshots...)
ROW_SCAN_KINDS = {
    "position_gap", "broken_link", "hash_mismatch", "stream_version_gap", "time_backwards", "malformed_row",
    "unreadable",
}  # fmt: skip


def forge(base: Path, tmp: Path, edit: str, position: int, *, keep_wal: bool = False) -> Path:
    sql, rechained = EDITS[edit]
    copy = drop_triggers_copy(base, tmp / f"{edit}-{position}.db")
    conn = sqlite3.connect(copy)
    conn.execute(sql, (position,))
    conn.commit()
    conn.close()
    if rechained:
        rechain(copy, position)
    if keep_wal:  # the same forged log with its last transaction still in a -wal file beside it
        out = tmp / f"{edit}-{position}-wal.db"
        conn = sqlite3.connect(copy)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
        conn.execute("INSERT INTO scratch VALUES (1)")
        conn.commit()
        shutil.copyfile(copy, out)
        shutil.copyfile(str(copy) + "-wal", str(out) + "-wal")
        conn.close()
        assert Path(str(out) + "-wal").stat().st_size > 0
        return out
    return copy


def test_the_accelerator_is_built() -> None:
    """scripts/install.sh builds it (pip install -e . runs setup.py); without it verify is several times slower."""
    accelerator()


def test_an_intact_log_is_vouched_for_by_the_c_scan_with_the_same_report(
    base: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, pub, cps = base
    assert c_verdict(path)[:3] == ("clean", N, N + 1)
    calls: list[tuple[str, int, int]] = []
    real = accelerator()

    class Spy:
        @staticmethod
        def scan(*args: Any) -> tuple[Any, ...]:
            out: tuple[Any, ...] = real.scan(*args)
            calls.append((out[0], args[1], args[-1]))  # (verdict, first position, mode)
            return out

    monkeypatch.setattr(ev, "ACCELERATOR", Spy)
    fast, slow = both(monkeypatch, lambda: ev.verify(path, checkpoints=cps, public_key=pub))
    assert sorted(calls) == [("clean", 1, 1), ("clean", N // 2 + 1, 2)]  # from the C scan, in two halves
    assert fast.to_dict() == slow.to_dict() and fast.render() == slow.render()
    assert fast.exit_code == 0 and fast.events_checked == N and fast.checkpoints_valid == 2
    assert fast.newest_checkpoint_position == N and fast.unsealed_tail == 0


@pytest.mark.parametrize("where", ["start", "before_seam", "seam", "after_seam", "end"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_every_forgery_gives_the_same_report_with_and_without_the_c_scan(
    base: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str, where: str
) -> None:
    path, pub, cps = base
    position = {"start": 1, "before_seam": N // 2 - 1, "seam": N // 2, "after_seam": N // 2 + 1, "end": N}[
        where
    ]
    forged = forge(path, tmp_path, edit, position)
    verdict = c_verdict(forged)
    vouched = fast_verdict(forged)
    for kwargs in ({}, {"checkpoints": cps, "public_key": pub}):
        fast, slow = both(monkeypatch, lambda kw=kwargs: ev.verify(forged, **kw))
        assert fast.to_dict() == slow.to_dict(), (edit, where, kwargs)
        assert fast.render() == slow.render()
        if kwargs:
            assert fast.exit_code == 1, (
                fast.render()
            )  # every edit of a sealed row is found against checkpoints
        else:  # the C scan stops exactly where the Python row scan has something to report
            found = {i.kind for i in slow.issues} & ROW_SCAN_KINDS
            assert verdict[0] == ("anomaly" if found else "clean"), (verdict, slow.render())
            assert vouched == (not found), slow.render()  # the same verdict from the two ranges joined


@pytest.mark.parametrize("edit", ["payload_byte", "deleted", "actor_not_utf8_rechained", "time_backwards"])
def test_a_log_with_a_wal_gives_the_same_report(
    base: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    path, pub, cps = base
    forged = forge(path, tmp_path, edit, N // 3, keep_wal=True)
    fast, slow = both(monkeypatch, lambda: ev.verify(forged, checkpoints=cps, public_key=pub))
    assert fast.to_dict() == slow.to_dict() and fast.wal_frames > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(forged.name)) == [
        forged.name,
        forged.name + "-wal",
    ]  # no -shm created beside the evidence by either scan


def test_event_types_against_a_registry_give_the_same_warnings(
    base: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = base
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as conn:
        types = {
            t: v for t, v in conn.execute("SELECT event_type, max(schema_version) FROM events GROUP BY 1")
        }
    calls: list[str] = []
    real = accelerator()

    class Spy:
        @staticmethod
        def scan(*args: Any) -> tuple[Any, ...]:
            out: tuple[Any, ...] = real.scan(*args)
            calls.append(out[0])
            return out

    monkeypatch.setattr(ev, "ACCELERATOR", Spy)
    fewer = dict(types)
    fewer.pop(sorted(types)[0])
    older = {t: v - 1 if t == sorted(types)[-1] else v for t, v in types.items()}
    for known in (types, fewer, older):
        fast, slow = both(monkeypatch, lambda k=known: ev.verify(path, known=k))
        assert fast.to_dict() == slow.to_dict() and fast.types_checked
        assert bool(fast.warnings) == (known is not types)
    assert (
        calls == ["clean"] * 6
    )  # each vouched clean by C (two halves); the two registries' warnings from Python


@pytest.mark.parametrize(
    ("after", "to"),
    [(0, None), (0, N), (N // 2, N), (N // 2 - 1, N // 2 + 1), (N // 3, N // 2), (N - 1, N + 5)],
)
@pytest.mark.parametrize(
    "edit",
    [
        "payload_byte",
        "hash_forged",
        "prev_hash_forged",
        "deleted",
        "hash_as_text",
        "stream_version_real",
        "schema_version_negative",
        "payload_as_text",
    ],
)
def test_verify_chain_range_agrees_at_the_edges_of_the_range(
    base: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: str,
    after: int,
    to: int | None,
) -> None:
    path, _, _ = base
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as conn:  # the anchor the caller vouches for
        row = conn.execute("SELECT hash FROM events WHERE position = ?", (after,)).fetchone()
        anchor = genesis_hash(ev.read_log_id(conn)) if after == 0 else bytes(row[0])
    last = N if to is None else min(to, N)
    for position in sorted({max(after, 1), after + 1, last, min(last + 1, N)}):
        forged = forge(path, tmp_path, edit, position)

        def run(p: Path = forged) -> Any:
            conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                return ev.verify_chain_range(conn, after, anchor, to)
            except LogIntegrityError as exc:
                return ("error", str(exc), exc.position, exc.kind)
            finally:
                conn.close()

        fast, slow = both(monkeypatch, run)
        assert fast == slow, (edit, position)
        forged.unlink()
    fast, slow = both(monkeypatch, lambda: run(path))
    assert fast == slow


def test_the_cli_prints_the_same_with_and_without_the_c_scan(
    base: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    path, pub, cps = base
    forged = forge(path, tmp_path, "stream_version", N // 2)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for log in (path, forged):
        for extra in ([], ["--json"], ["--checkpoints", str(cps), "--public-key", str(pub)]):
            argv = [sys.executable, "-m", "events", "verify", str(log), *extra]
            fast = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            slow = subprocess.run(argv, env=env | {"EVENTS_VERIFY_PURE_PYTHON": "1"}, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
            assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
            assert fast.returncode == (0 if log == path else 1)
            if extra == ["--json"]:
                assert json.loads(fast.stdout)["events_checked"] == N


def test_verify_chain_range_on_a_live_log_is_vouched_for_by_the_c_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's case (moldd/integrity.py): its own WAL-mode file, open by the store, read through a plain
    mode=ro connection; the C scan opens the file again by its name and must see the same rows."""
    import asyncio

    from events import NewEvent, SQLiteEventStore

    path = tmp_path / "live.db"
    calls: list[str] = []
    real = accelerator()

    class Spy:
        @staticmethod
        def scan(*args: Any) -> tuple[Any, ...]:
            out: tuple[Any, ...] = real.scan(*args)
            calls.append(out[0])
            return out

    monkeypatch.setattr(ev, "ACCELERATOR", Spy)

    async def run() -> None:
        store = await SQLiteEventStore.async_open(path)
        try:
            for i in range(40):
                await store.async_append(f"s-{i % 4}", [NewEvent("t.x", {"i": i, "é": "ü" * i})])
            head = await store.async_head()
            conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                log_id = ev.read_log_id(conn)
                fast = ev.verify_chain_range(conn, 0, genesis_hash(log_id))
                mid = bytes(conn.execute("SELECT hash FROM events WHERE position = 10").fetchone()[0])
                fast_part = ev.verify_chain_range(conn, 10, mid, 30)
                with monkeypatch.context() as m:
                    m.setattr(ev, "ACCELERATOR", None)
                    slow = ev.verify_chain_range(conn, 0, genesis_hash(log_id))
                    slow_part = ev.verify_chain_range(conn, 10, mid, 30)
            finally:
                conn.close()
            assert fast == slow == (head[0], head[1]) and fast_part == slow_part and fast_part[0] == 30
        finally:
            await store.async_close()

    asyncio.run(run())
    assert calls == ["clean", "clean"]


def _colliding_ids(count: int) -> list[bytes]:
    """16-byte stream ids with the same 64-bit hash in the C scan's map (its hash_bytes, reproduced here)."""
    mask = 2**64 - 1

    def block(h: int, w: int) -> int:
        h = ((h ^ w) * 0xFF51AFD7ED558CCD) & mask
        return h ^ (h >> 32)

    out = []
    for i in range(count):
        w1 = int.from_bytes(hashlib.sha256(b"%d" % i).digest()[:8], "little")
        h1 = block(0x9E3779B97F4A7C15 ^ 16, w1)
        w2 = h1 ^ 0x0123456789ABCDEF  # the state entering the last mix is this constant for every id
        out.append(w1.to_bytes(8, "little") + w2.to_bytes(8, "little"))
    return out


def test_stream_ids_crafted_to_collide_do_not_slow_the_scan_down(
    base: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged log whose 1,500 stream ids all share one hash: the C scan gives up after a bounded number of
    probes (no quadratic time) and the Python scan (SipHash'd dict) writes the same report as ever."""
    path, _, _ = base
    forged = drop_triggers_copy(path, tmp_path / "collide.db")
    with sqlite3.connect(forged) as conn:
        for pos, sid in zip(range(1, N + 1), _colliding_ids(N), strict=True):
            conn.execute(
                "UPDATE events SET stream_id = CAST(? AS TEXT), stream_version = 1 WHERE position = ?",
                (sid, pos),
            )
    rechain(forged, 1)
    verdict = c_verdict(forged)
    assert verdict[0] == "anomaly" and "collisions" in verdict[2], verdict
    assert 512 < verdict[1] < N  # it stopped once a probe sequence passed its bound
    fast, slow = both(monkeypatch, lambda: ev.verify(forged))
    assert fast.to_dict() == slow.to_dict() and fast.exit_code == 0 and fast.streams == N


COLUMN_NAMES = ev.COLUMNS.split(", ")


@settings(
    database=None, max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    position=st.sampled_from([1, 2, N // 2 - 1, N // 2, N // 2 + 1, N - 1, N]),
    column=st.sampled_from(COLUMN_NAMES[1:]),
    value=st.one_of(
        st.binary(max_size=40),
        st.text(max_size=20),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.none(),
        st.binary(min_size=1, max_size=12).map(lambda b: ("not-utf8", b"\xff" + b)),
    ),
    rechained=st.booleans(),
)
def test_random_forgeries_give_the_same_verdict_and_report(
    base: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    position: int,
    column: str,
    value: Any,
    rechained: bool,
) -> None:
    """Any value of any type in any column, at the start, around the seam or at the end, with or without the
    chain recomputed after it: the C scan (split at the seam) stops exactly when the Python scan has a row to
    report, and the reports are identical."""
    path, _, _ = base
    forged = drop_triggers_copy(path, tmp_path / f"random-{os.urandom(4).hex()}.db")
    sql = f"UPDATE events SET {column} = ? WHERE position = ?"
    if isinstance(value, tuple):  # text holding bytes that are not UTF-8
        sql = f"UPDATE events SET {column} = CAST(? AS TEXT) WHERE position = ?"
        value = value[1]
    try:
        with sqlite3.connect(forged) as conn:
            conn.execute(sql, (value, position))
        if rechained:
            rechain(forged, position)
    except (sqlite3.IntegrityError, TypeError, struct.error, OverflowError):
        # NOT NULL / UNIQUE refuse it, or the forger's own rechain cannot hash a value of that type
        forged.unlink()
        assume(False)
    fast, slow = both(monkeypatch, lambda: ev.verify(forged))
    assert fast.to_dict() == slow.to_dict()
    found = {i.kind for i in slow.issues} & ROW_SCAN_KINDS
    assert fast_verdict(forged) == (not found), slow.render()
    forged.unlink()
