"""Copy a log between SQLite and PostgreSQL, row for row: same log id, positions, hashes, command ids.

The copy checks the hash chain of every row it reads (a log that does not verify is not copied) and then
re-reads the destination: it ends with the source's head hash or it fails. ``python -m events copy SRC DST``.
A PostgreSQL log is verified by `verify_target`: its rows are copied, unchecked, into a temporary SQLite file
that `events.verify` then checks exactly as it checks a file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .chain import encode_fields, genesis_hash, link_hash
from .errors import EventLogError, NotALogError
from .postgres import (
    COLUMNS,
    COMMAND_NAMES,
    DEFAULT_SCHEMA,
    async_insert_rows,
    async_migrate,
    is_dsn,
    quote_ident,
)
from .writer import CommandRow, Row

BATCH = 5000


class _Source:
    log_id: str

    def rows(self, batch: int) -> AsyncIterator[list[Row]]:
        raise NotImplementedError

    async def async_commands(self) -> list[CommandRow]:
        raise NotImplementedError

    async def async_close(self) -> None:
        return None


class _SQLiteSource(_Source):
    def __init__(self, path: str | Path) -> None:
        from .verify import open_readonly, read_log_id

        self.conn = open_readonly(path)
        self.log_id = read_log_id(self.conn)

    async def rows(self, batch: int) -> AsyncIterator[list[Row]]:
        after = 0
        while True:
            # a short blocking read per batch: the copy tool has nothing else to run meanwhile
            rows = self.conn.execute(
                f"SELECT {COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?", (after, batch)
            ).fetchall()
            if not rows:
                return
            yield [(*r[:10], bytes(r[10]), bytes(r[11]), bytes(r[12])) for r in rows]
            after = rows[-1][0]

    async def async_commands(self) -> list[CommandRow]:
        rows = self.conn.execute(
            f"SELECT {', '.join(COMMAND_NAMES)} FROM commands ORDER BY first_position"
        ).fetchall()
        return [tuple(r) for r in rows]

    async def async_close(self) -> None:
        self.conn.close()


class _PostgresSource(_Source):
    def __init__(self, conn: Any, schema: str, log_id: str) -> None:
        self.conn = conn
        self.s = quote_ident(schema)
        self.log_id = log_id

    @classmethod
    async def async_open(cls, dsn: str, schema: str) -> _PostgresSource:
        import asyncpg

        conn = await asyncpg.connect(dsn, server_settings={"application_name": "events-copy"})
        try:
            log_id = await async_migrate(conn, schema, create=False)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, schema, log_id)

    async def rows(self, batch: int) -> AsyncIterator[list[Row]]:
        after = 0
        while True:
            rows = await self.conn.fetch(
                f"SELECT {COLUMNS} FROM {self.s}.events WHERE position > $1 ORDER BY position LIMIT $2",
                after,
                batch,
            )
            if not rows:
                return
            yield [tuple(r) for r in rows]
            after = rows[-1][0]

    async def async_commands(self) -> list[CommandRow]:
        rows = await self.conn.fetch(
            f"SELECT {', '.join(COMMAND_NAMES)} FROM {self.s}.commands ORDER BY first_position"
        )
        return [tuple(r) for r in rows]

    async def async_close(self) -> None:
        await self.conn.close()


async def _async_open_source(target: str | Path, schema: str) -> _Source:
    if is_dsn(target):
        return await _PostgresSource.async_open(str(target), schema)
    return _SQLiteSource(target)


class _Chain:
    """Checks rows one after the other against the hash chain."""

    def __init__(self, log_id: str) -> None:
        self.prev = genesis_hash(log_id)
        self.position = 0

    def check(self, row: Row) -> None:
        pos = row[0]
        if pos != self.position + 1:
            raise EventLogError(
                f"the log has a gap: position {pos} follows {self.position}", code="not_verified"
            )
        fields = encode_fields(row[1], row[3], row[6], row[7], row[8], row[9])
        if bytes(row[11]) != self.prev or link_hash(
            self.prev, pos, row[2], row[5], row[4], fields, bytes(row[10])
        ) != bytes(row[12]):
            raise EventLogError(f"the log does not verify at position {pos}: not copied", code="not_verified")
        self.prev = bytes(row[12])
        self.position = pos


def _create_sqlite(path: Path, log_id: str) -> sqlite3.Connection:
    from . import sqlite as sq

    if path.exists():
        raise EventLogError(f"{path} exists: the destination must be a new file", code="destination_exists")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {sq.PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    for stmt in sq.SCHEMA:
        conn.execute(stmt)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("format", sq.FORMAT), ("log_id", log_id), ("schema_version", str(sq.SCHEMA_VERSION))],
    )
    conn.execute(f"PRAGMA user_version = {sq.SCHEMA_VERSION}")
    conn.execute("COMMIT")
    return conn


async def async_copy(
    src: str | Path,
    dst: str | Path,
    *,
    src_schema: str = DEFAULT_SCHEMA,
    dst_schema: str = DEFAULT_SCHEMA,
    check: bool = True,
    batch: int = BATCH,
) -> tuple[str, int, bytes]:
    """Copy the log at `src` (file or DSN) to `dst` (a new file, or a DSN whose schema holds no log or an
    empty one with the same id). Returns (log id, last position, head hash) of the destination, re-read."""
    source = await _async_open_source(src, src_schema)
    try:
        chain = _Chain(source.log_id)
        if is_dsn(dst):
            import asyncpg

            conn = await asyncpg.connect(str(dst), server_settings={"application_name": "events-copy"})
            try:
                await async_migrate(conn, dst_schema, create=True, log_id=source.log_id)
                s = quote_ident(dst_schema)
                if await conn.fetchval(f"SELECT count(*) FROM {s}.events") or await conn.fetchval(
                    f"SELECT count(*) FROM {s}.epochs"
                ):
                    raise EventLogError(
                        f"{dst} schema {dst_schema} already holds events", code="destination_exists"
                    )
                async for rows in source.rows(batch):
                    if check:
                        for r in rows:
                            chain.check(r)
                    await async_insert_rows(conn, dst_schema, rows)
                await async_insert_rows(conn, dst_schema, [], await source.async_commands())
            finally:
                await conn.close()
        else:
            path = Path(dst)
            out = _create_sqlite(path, source.log_id)
            try:
                async for rows in source.rows(batch):
                    if check:
                        for r in rows:
                            chain.check(r)
                    out.execute("BEGIN IMMEDIATE")
                    out.executemany(
                        f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
                    )
                    out.execute("COMMIT")
                # command ids live in the chained rows (SQLite schema 2 keeps no `commands` rows)
            finally:
                out.close()
    finally:
        await source.async_close()
    if not check:
        return source.log_id, chain.position, chain.prev
    # re-read the destination: it must verify and end with the source's head
    again = await _async_open_source(dst, dst_schema)
    try:
        check_dst = _Chain(again.log_id)
        async for rows in again.rows(batch):
            for r in rows:
                check_dst.check(r)
    finally:
        await again.async_close()
    if (again.log_id, check_dst.position, check_dst.prev) != (source.log_id, chain.position, chain.prev):
        raise EventLogError(
            f"the copy ends at position {check_dst.position} with head {check_dst.prev.hex()}, the source at "
            f"{chain.position} with {chain.prev.hex()}",
            code="not_verified",
        )
    return again.log_id, check_dst.position, check_dst.prev


def materialise(
    target: str | Path, schema: str = DEFAULT_SCHEMA
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """A file holding the log at `target`: the file itself, or for a DSN an unchecked row-for-row copy in a
    temporary directory (returned too: clean it up when done). Raises NotALogError, EventLogError."""
    if not is_dsn(target):
        return Path(target), None
    tmp = tempfile.TemporaryDirectory(prefix="events-pg-")
    path = Path(tmp.name) / "log.db"
    try:
        asyncio.run(async_copy(str(target), path, src_schema=schema, check=False))
    except OSError as exc:
        tmp.cleanup()
        raise NotALogError(f"cannot read the log at {target}: {exc}") from exc
    except BaseException:
        tmp.cleanup()
        raise
    return path, tmp


def verify_target(target: str | Path, *, schema: str = DEFAULT_SCHEMA, **kw: Any) -> Any:
    """events.verify on a file or on a PostgreSQL DSN (same checks, same report; report.path is `target`)."""
    from .verify import VerifyReport, verify

    if not is_dsn(target):
        return verify(target, **kw)
    try:
        path, tmp = materialise(target, schema)
    except Exception as exc:
        return VerifyReport(path=str(target), status="error", error=f"{type(exc).__name__}: {exc}")
    try:
        report = verify(path, **kw)
        report.path = str(target)
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()
