"""Read a moldd log file read-only, without the daemon: open, iterate events, parse positions and times.

Every function here opens the file with SQLite's ``mode=ro`` URI (through ``events.verify.open_readonly``), so
an audit never changes the evidence. Problems with the input raise :class:`AuditError`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from events import EventLogError, StoredEvent
from events.canonical import loads
from events.envelope import datetime_to_us, us_to_datetime
from events.verify import open_readonly, read_head, read_log_id
from moldd.audit.errors import AuditError
from moldd.eventtypes import EVENT_TYPES, upcasters
from moldd.projection import readmodel
from moldd.projection.readmodel import FOLD_COLUMNS, ReadModel

COLUMNS = (
    "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash"
)
BATCH = 5000


@dataclass(frozen=True)
class LogInfo:
    path: str
    log_id: str
    last_position: int
    head_hash: str


@contextmanager
def open_log(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the log at ``path``; AuditError if it is missing or not an event log."""
    try:
        conn = open_readonly(path)
    except EventLogError as exc:
        raise AuditError(f"{path}: {exc.message}", field="db") from exc
    try:
        try:
            read_log_id(conn)
        except EventLogError as exc:
            raise AuditError(f"{path}: {exc.message}", field="db") from exc
        yield conn
    finally:
        conn.close()


def log_info(conn: sqlite3.Connection, path: str | Path) -> LogInfo:
    try:
        log_id, last, head = read_head(conn)
    except EventLogError as exc:
        raise AuditError(f"{path}: {exc.message}", field="db") from exc
    return LogInfo(str(path), log_id, last, head.hex())


def iter_rows(
    conn: sqlite3.Connection, from_position: int = 1, to_position: int | None = None
) -> Iterator[tuple[object, ...]]:
    """Stored rows (storage column order) in position order, batched so a big log does not fill memory."""
    start = from_position
    end = 2**62 if to_position is None else to_position
    while True:
        try:
            batch = conn.execute(
                f"SELECT {COLUMNS} FROM events WHERE position >= ? AND position <= ? ORDER BY position LIMIT ?",
                (start, end, BATCH),
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"cannot read the log: {exc}", field="db") from exc
        if not batch:
            return
        yield from batch
        start = int(batch[-1][0]) + 1


def iter_fold_batches(
    conn: sqlite3.Connection, from_position: int = 1, to_position: int | None = None
) -> Iterator[tuple[list[tuple[object, ...]], bool]]:
    """Batches of stored rows for ``ReadModel.apply_rows`` (its ``FOLD_COLUMNS``), in position order, each with
    whether its rows' position, event type, schema version and time are known to have the column types
    ``iter_events`` requires (read by the fold's C accelerator, ``readmodel.ACCELERATOR``, over its own read-only
    connection to the same file; a batch it does not vouch for is read through ``conn``)."""
    start = from_position
    end = 2**62 if to_position is None else to_position
    sql = f"SELECT {', '.join(FOLD_COLUMNS)} FROM events WHERE position >= ? AND position <= ? ORDER BY position LIMIT ?"
    accel = readmodel.ACCELERATOR
    uri = getattr(conn, "uri", None) if accel is not None else None
    if not isinstance(uri, str):
        accel = None
    with ThreadPoolExecutor(1, thread_name_prefix="fold-read") as reader:
        # with the accelerator the next batch is read on a thread (SQLite without the GIL) while this one is folded
        ahead: Future[list[tuple[object, ...]] | None] | None = None
        while True:
            batch: list[tuple[object, ...]] | None = None
            if accel is not None:
                batch = ahead.result() if ahead is not None else accel.read(uri, start, end, BATCH, True)
                ahead = None
            typed = batch is not None
            if batch is None:
                try:
                    batch = conn.execute(sql, (start, end, BATCH)).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise AuditError(f"cannot read the log: {exc}", field="db") from exc
            if not batch:
                return
            start = int(batch[-1][0]) + 1  # type: ignore[call-overload]
            if accel is not None and len(batch) == BATCH:
                ahead = reader.submit(accel.read, uri, start, end, BATCH, True)
            yield batch, typed


def hash_at(conn: sqlite3.Connection, position: int) -> bytes:
    """The stored chain hash of the row at ``position``."""
    try:
        row = conn.execute("SELECT hash FROM events WHERE position = ?", (position,)).fetchone()
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"cannot read the log: {exc}", field="db") from exc
    if row is None:
        raise AuditError(f"position {position} is not in the log", field="db")
    return bytes(row[0])


def check_schema(
    event_type: str, schema_version: int, position: int, known: Mapping[str, int] = EVENT_TYPES
) -> None:
    """A version from the future cannot be folded faithfully: refuse rather than show a wrong state."""
    current = known.get(event_type)
    if current is not None and schema_version > current:
        raise AuditError(
            f"position {position}: {event_type!r} has schema version {schema_version}, this moldd knows up to "
            f"{current} (a log written by a newer moldd: use that version's moldd-audit)",
            field="db",
        )


_new_tuple = tuple.__new__


def iter_events(
    conn: sqlite3.Connection, from_position: int = 1, to_position: int | None = None
) -> Iterator[StoredEvent]:
    """Events as the daemon's store returns them (payload decoded and upcast), in position order."""
    up = upcasters()
    for row in iter_rows(conn, from_position, to_position):
        pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, prev_h, h = row
        if not (isinstance(pos, int) and isinstance(et, str) and isinstance(schv, int) and isinstance(ts, int)):
            raise AuditError(f"position {pos!r}: a column of the row has the wrong type; run verify", field="db")
        check_schema(et, schv, pos)
        try:
            data = loads(payload)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise AuditError(
                f"position {pos}: the payload is not JSON ({exc}); run verify", field="db"
            ) from exc
        if up.needs_upcast(et, schv):
            schv, data = up.upcast(et, schv, data)
        yield _new_tuple(StoredEvent, (  # StoredEvent(...) without the NamedTuple's Python-level __new__
            pos, str(sid), int(sv), et, schv, us_to_datetime(ts), str(actor),  # type: ignore[call-overload]
            cid, caus, corr, data, bytes(prev_h), bytes(h),  # type: ignore[call-overload]
        ))  # fmt: skip


def fold_into(model: ReadModel, ev: StoredEvent) -> None:
    """``model.apply(ev)``. ReadModel's EventLike protocol declares settable attributes, which a NamedTuple
    StoredEvent (what the daemon folds too) does not have; the fold only reads them."""
    model.apply(cast(Any, ev))


def parse_time(text: str) -> datetime:
    """ISO 8601 (``2024-05-01T12:00:00Z``, ``2024-05-01T14:00:00+02:00``, ``2024-05-01``); no zone means UTC."""
    raw = text.strip()
    try:
        dt = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError as exc:
        raise AuditError(
            f"--at-time {text!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)", field="at_time"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def time_to_us(dt: datetime) -> int:
    return datetime_to_us(dt)


def iso(dt: datetime) -> str:
    """ISO 8601 UTC with microseconds and a Z, the format of every time moldd-audit prints."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
