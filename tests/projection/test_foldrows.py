"""The fold's C accelerator (moldd/projection/_foldrows.c) against the pure-Python code it replaces, and the bulk
fold paths with it and without it (``MOLDD_FOLD_PURE_PYTHON``): the same rows, texts, decoded payloads and
read-model state, on sweeps of values and column types the daemon never writes but a log file can hold."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events import NewEvent, SQLiteEventStore, Upcasters
from events.canonical import loads as canonical_loads
from events.canonical import may_have_long_int
from events.envelope import us_to_datetime
from moldd.app.projector import Projector
from moldd.audit.log import open_log
from moldd.audit.state import fold
from moldd.eventtypes import EVENT_TYPES
from moldd.projection import readmodel
from moldd.projection.readmodel import FOLD_COLUMNS, ReadModel, iso_us
from tests.accelerators import required_accelerator
from tests.projection.fold_corpus import (
    MAX_FINISHED_JOBS,
    PRUNE_SLACK,
    REFERENCE,
    corpus,
    model_digests,
    write_sqlite,
)


def accelerator() -> Any:
    return required_accelerator(readmodel.ACCELERATOR, "MOLDD_FOLD_PURE_PYTHON", "moldd.projection._foldrows")


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pure-Python fold (as without the accelerator built)."""
    monkeypatch.setattr(readmodel, "ACCELERATOR", None)
    yield


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        value = fn(*args)
    except Exception as exc:  # the same kind of error is part of "the same"
        return "raised", type(exc)
    if isinstance(value, float) and math.isnan(value):
        return "nan", None
    return "value", value


# -- iso_us ---------------------------------------------------------------------------------------------------
def test_iso_us_in_c_is_the_python_iso_us_for_a_sweep_of_times() -> None:
    accel = accelerator()
    rnd = random.Random(5)
    first, last = -62_135_596_800_000_000, 253_402_300_799_999_999  # 0001-01-01 .. 9999-12-31T23:59:59.999999
    values = [0, 1, -1, 999_999, 1_000_000, -1_000_000, -1_500_001, 86_399_999_999, 86_400_000_000, first, last]
    values += [first - 1, last + 1, 2**63 - 1, -(2**63), 2**64, -(2**70), True, False]  # Python decides these
    values += [951_782_400_000_000 + d for d in (-1, 0, 1, 86_400_000_000)]  # around 2000-02-29
    values += [rnd.randrange(first, last) for _ in range(20_000)]
    values += [rnd.randrange(-(10**12), 10**12) * 1_000_000 for _ in range(2000)]  # whole seconds
    for us in values:
        assert _outcome(accel.iso_us, us) == _outcome(iso_us, us), us
        if first <= us <= last:
            assert accel.iso_us(us) == us_to_datetime(us).isoformat(), us
    for bad in (1.5, "1", None):
        assert _outcome(accel.iso_us, bad) == _outcome(iso_us, bad)


# -- may_have_long_int, decode ----------------------------------------------------------------------------------
def _payloads() -> list[Any]:
    rnd = random.Random(7)
    out: list[Any] = [b"{}", b"", b"[]", b"{not json", b"NaN", b"[NaN, Infinity]", b'"\\ud800"', b"[" * 2000 + b"]" * 2000]
    for run in (17, 18, 19, 20, 25):
        digits = "".join(rnd.choice("0123456789") for _ in range(run))
        for text in (digits, f'{{"a":{digits}}}', f'{{"a":-{digits}}}', f'{{"a":"{digits}"}}', f'{{"a":{digits}.5}}'):
            out.append(text.encode())
    out += [b'{"a":1234567890123456789}', b'{"a":123456789012345678,"b":1}', b'{"a":1e400}', b'{"a":1}  ']
    out += [b'{"a":"\xe9"}', b'{"\xff":1}', '{"a":"é"}', '{"a":12345678901234567890}', bytearray(b'{"a":1}')]
    for _ in range(500):
        value = {"n": rnd.randrange(-(2**70), 2**70), "s": "x" * rnd.randrange(5), "l": [rnd.random()]}
        out.append(json.dumps(value, sort_keys=True).encode())
    return out


def test_may_have_long_int_and_decode_in_c_are_the_python_ones() -> None:
    accel = accelerator()
    for p in _payloads():
        if isinstance(p, (bytes, bytearray)):
            assert accel.may_have_long_int(p) is may_have_long_int(bytes(p)), p
        assert _outcome(accel.decode, p) == _outcome(canonical_loads, p), p


# -- read ------------------------------------------------------------------------------------------------------
def _bare_log(path: Path, rows: list[tuple[Any, ...]]) -> str:
    """A table of the fold's columns, without types (any value of any storage class), and its read-only URI."""
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE events ({', '.join(FOLD_COLUMNS)})")
    conn.executemany(f"INSERT INTO events VALUES ({', '.join('?' * len(FOLD_COLUMNS))})", rows)
    conn.commit()
    conn.close()
    return path.resolve().as_uri() + "?mode=ro"


def _python_read(uri: str, start: int, end: int, limit: int) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(uri, uri=True)
    try:
        sql = f"SELECT {', '.join(FOLD_COLUMNS)} FROM events WHERE position >= ? AND position <= ? ORDER BY position LIMIT ?"
        return conn.execute(sql, (start, end, limit)).fetchall()
    finally:
        conn.close()


def test_read_gives_the_rows_python_sqlite3_gives_for_every_storage_class(tmp_path: Path) -> None:
    accel = accelerator()
    rnd = random.Random(3)
    values: list[Any] = [None, 0, -1, 2**63 - 1, -(2**63), 1.5, -0.0, 1e300, "", "é€😀", "vm-a", b"", b"\x00\xff", b"{}"]
    values += ["x" * 5000, b"y" * 70_000]  # bigger than a page
    rows = []
    for pos in range(1, 400):
        row = [pos] + [rnd.choice(values) for _ in FOLD_COLUMNS[1:]]
        if pos % 7 == 0:
            row[1], row[3], row[6] = "vm-same", "vm.started", "ops"  # repeated texts (shared objects)
        rows.append(tuple(row))
    rows.append(("text position", "s", 1, "t", 1, 1, "a", None, b"{}"))
    rows.append((None, "s", 1, "t", 1, 1, "a", None, b"{}"))
    uri = _bare_log(tmp_path / "bare.db", rows)
    for start, end, limit in ((1, 2**62, 10_000), (1, 2**62, 7), (5, 9, 100), (398, 2**62, 5), (500, 600, 10), (1, 0, 5)):
        assert accel.read(uri, start, end, limit) == _python_read(uri, start, end, limit)
        assert accel.read(uri, start, end, limit, False) == _python_read(uri, start, end, limit)
    assert accel.read(uri, 1, 2**62, 0) == []
    got = accel.read(uri, 1, 2**62, 10_000)
    assert got is not None and all(type(a) is type(b) for r, s in zip(got, _python_read(uri, 1, 2**62, 10_000), strict=True) for a, b in zip(r, s, strict=True))


def test_read_hands_back_what_it_does_not_vouch_for(tmp_path: Path) -> None:
    accel = accelerator()
    good = [(p, "vm-a", p, "vm.started", 1, 1_000_000 * p, "ops", None, b"{}") for p in range(1, 11)]
    uri = _bare_log(tmp_path / "good.db", good)
    assert accel.read(uri, 1, 2**62, 100, True) == _python_read(uri, 1, 2**62, 100)
    # a column of the wrong type: typed reads refuse the batch (the caller's own checks then name the row)
    for col, value in ((3, 5), (3, None), (3, b"vm.started"), (4, "1"), (4, 1.0), (5, 1.5), (5, None)):
        row = list(good[4])
        row[col] = value
        uri = _bare_log(tmp_path / f"typed-{col}-{value!r}.db", [*good[:4], tuple(row), *good[5:]])
        assert accel.read(uri, 1, 2**62, 100, True) is None, (col, value)
        assert accel.read(uri, 1, 2**62, 100) == _python_read(uri, 1, 2**62, 100)
    # text that is not UTF-8: sqlite3 raises, the accelerator hands the batch back
    path = tmp_path / "latin1.db"
    uri = _bare_log(path, good)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE events SET actor = CAST(X'E9' AS TEXT) WHERE position = 3")
    conn.commit()
    conn.close()
    assert accel.read(uri, 1, 2**62, 100) is None
    with pytest.raises(sqlite3.OperationalError):
        _python_read(uri, 1, 2**62, 100)
    assert accel.read(uri, 4, 2**62, 100) == _python_read(uri, 4, 2**62, 100)  # the rows after it are fine
    # no such file, not a database, no events table
    assert accel.read((tmp_path / "missing.db").as_uri() + "?mode=ro", 1, 10, 10) is None
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert accel.read((tmp_path / "junk.db").as_uri() + "?mode=ro", 1, 10, 10) is None
    sqlite3.connect(tmp_path / "empty.db").close()
    assert accel.read((tmp_path / "empty.db").as_uri() + "?mode=ro", 1, 10, 10) is None
    with pytest.raises(ValueError):
        accel.read(uri, 1, 10, -1)


# -- the fold paths, with and without the accelerator ------------------------------------------------------------
UPCASTS: list[int] = []


def _foreign_and_upcast_log(path: Path) -> tuple[list[Any], Upcasters]:
    """The corpus plus what the daemon's own log never holds: foreign event types on VM and other streams,
    and events of an old schema version that an upcaster brings up."""
    events = corpus(2, 1500)
    up = Upcasters()
    up.declare_many(EVENT_TYPES)
    up.declare("vm.updated", 2)

    @up.upcaster("vm.updated", 1)
    def _v1(payload: dict[str, Any]) -> dict[str, Any]:
        UPCASTS.append(1)
        changes = payload.get("changes", {})
        return {"changes": {k: (f"{v}-v2" if isinstance(v, str) else v) for k, v in changes.items()}}

    rnd = random.Random(11)
    rows = []
    write_sqlite(path, events)
    conn = sqlite3.connect(path, isolation_level=None)
    for name in [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]:
        conn.execute(f"DROP TRIGGER {name}")
    # some events become foreign types, some vm.updated an older schema version (upcast on read)
    for pos, et in conn.execute("SELECT position, event_type FROM events").fetchall():
        if et == "vm.updated" and rnd.random() < 0.7:
            rows.append(("UPDATE events SET schema_version = 1 WHERE position = ?", pos))
        elif et == "vm.reboot.requested" and rnd.random() < 0.5:
            rows.append(("UPDATE events SET event_type = 'acme.vm.audited' WHERE position = ?", pos))
        elif et == "host.link" and rnd.random() < 0.5:
            rows.append(("UPDATE events SET event_type = 'acme.host.poked' WHERE position = ?", pos))
    # (schema 2 is now current for vm.updated: its events that stay at 1 are upcast; the rest, written as 2)
    conn.execute("UPDATE events SET schema_version = 2 WHERE event_type = 'vm.updated'")
    for sql, pos in rows:
        conn.execute(sql, (pos,))
    conn.close()
    return events, up


async def _restore(path: Path, up: Upcasters | None) -> ReadModel:
    store = await SQLiteEventStore.async_open(path, upcasters=up)
    try:
        p = Projector(store)
        await p.async_restore()
        return p.model
    finally:
        await store.async_close()


async def _live(path: Path, up: Upcasters | None) -> ReadModel:
    store = await SQLiteEventStore.async_open(path, upcasters=up)
    try:
        return ReadModel().apply_all(await store.async_read(1))
    finally:
        await store.async_close()


async def test_the_restore_is_the_same_with_and_without_the_accelerator_foreign_types_and_upcasts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator()
    path = tmp_path / "log.db"
    _, up = _foreign_and_upcast_log(path)
    live = model_digests(await _live(path, up))  # StoredEvents (upcast by the store) through ReadModel.apply
    UPCASTS.clear()
    fast = model_digests(await _restore(path, up))
    upcast = len(UPCASTS)
    with monkeypatch.context() as m:
        m.setattr(readmodel, "ACCELERATOR", None)
        slow = model_digests(await _restore(path, up))
    assert fast == slow == live
    assert upcast > 10 and len(UPCASTS) == 2 * upcast  # old versions were brought up, by both paths alike
    with sqlite3.connect(path) as conn:
        foreign = conn.execute("SELECT count(*) FROM events WHERE event_type LIKE 'acme.%'").fetchone()[0]
    assert foreign > 10
    assert fast != model_digests(await _restore(path, None))  # (without the upcaster the state differs)


def test_the_audit_fold_is_the_same_with_and_without_the_accelerator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator()
    monkeypatch.setattr(readmodel, "MAX_FINISHED_JOBS", MAX_FINISHED_JOBS)  # the reference's limits
    monkeypatch.setattr(readmodel, "PRUNE_SLACK", PRUNE_SLACK)
    path = tmp_path / "log.db"
    write_sqlite(path, corpus(3))
    ref = json.loads(REFERENCE.read_text())["3"]
    checked = [int(p) for p in ref][::5]
    with open_log(path) as conn:
        for pos in [1, 777, *checked]:
            fast, at_f, h_f = fold(conn, to_position=pos)
            with monkeypatch.context() as m:
                m.setattr(readmodel, "ACCELERATOR", None)
                slow, at_s, h_s = fold(conn, to_position=pos)
            assert (model_digests(fast), at_f, h_f) == (model_digests(slow), at_s, h_s)
            if str(pos) in ref:
                assert model_digests(fast) == ref[str(pos)], pos


async def test_a_restore_reads_a_batch_the_accelerator_refuses_through_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator()
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    try:
        for ev in corpus(1, 300):
            await store.async_append(ev.stream_id, [NewEvent(ev.event_type, ev.payload, correlation_id=ev.correlation_id)])
        calls: list[int] = []
        real = readmodel.ACCELERATOR

        class Refusing:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def read(self, *args: Any) -> None:
                calls.append(args[1])
                return None  # e.g. a row it does not vouch for

        monkeypatch.setattr(readmodel, "ACCELERATOR", Refusing())
        p = Projector(store)
        await p.async_restore()
        assert calls and p.model.position == 300
        assert model_digests(p.model) == model_digests(ReadModel().apply_all(await store.async_read(1)))
    finally:
        await store.async_close()
