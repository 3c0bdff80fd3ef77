"""SQLiteEventStore: the log in one SQLite file (WAL, synchronous=FULL): read through aiosqlite, written by a
connection on a thread of its own (``WriteThread``: one hop there and one call back per group commit).

The library creates and migrates its schema (PRAGMA user_version + a meta table holding the log id).
Rows of `events`, `commands` and `meta` cannot be updated, deleted or replaced: triggers abort UPDATE, DELETE
and an INSERT onto an existing key (`INSERT OR REPLACE`/`REPLACE INTO`, which fire no delete trigger) for every
client of the file, not just this code. The triggers stop mistakes and careless tools; whoever can write the
file can drop them: that is what the hash chain and the signed, off-host checkpoints of `events.verify` are for.

Idempotency (command ids) is derived from the chained `command_id` column of `events` (indexed), never from
a table outside the chain: schema version 2 no longer writes the legacy `commands` table.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar, cast

import aiosqlite

from .chain import genesis_hash
from .envelope import AppendResult, StoredEvent
from .errors import EventLogError, NotALogError, StoreClosedError
from .store import DEFAULT_MAX_PAYLOAD_BYTES, Clock, EventStore, SnapshotRow
from .upcast import Upcasters
from .writer import CommandRow, CommitDone, Row, command_from_rows

_T = TypeVar("_T")


async def _in_thread(conn: aiosqlite.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn(*args)` on the connection's own thread (aiosqlite's private, untyped `_execute`)."""
    execute = cast(Callable[..., Awaitable[_T]], conn._execute)
    return await execute(fn, *args)

SCHEMA_VERSION = 3
"""1: events + commands tables. 2: idempotency from events.command_id (index), REPLACE refused by triggers.
3: no index on recorded_at (it cost every commit a page; reads by time search the position order instead,
since recorded_at never goes backwards along the chain)."""
REPLACE_TRIGGERS_SINCE = 2
"""The schema version that added the *_no_replace triggers (a log older than that lacks them until opened)."""
FILE_MODE = 0o600
# New logs use 1 KiB pages: each group commit rewrites one leaf page of the (stream_id, stream_version) index
# per stream it touches, and every rewritten page is a whole WAL frame; 1 KiB pages write ~45% fewer bytes per
# event than SQLite's default 4 KiB (bench/append.py prints B/event). An existing log keeps its page size.
PAGE_SIZE = 1024
WAL_AUTOCHECKPOINT_BYTES = 40_960_000
FORMAT = "events.log"

COLUMNS = (
    "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash"
)
INSERT_EVENT = f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
INSERT_COMMAND = (
    "INSERT INTO commands (command_id, stream_id, first_position, last_position, stream_version) "
    "VALUES (?,?,?,?,?)"
)

def tuning(page_size: int) -> tuple[str, ...]:
    """The connection pragmas of a log whose pages are `page_size` bytes."""
    return (
        # Checkpoint the WAL into the database every ~40 MB instead of every ~4 MB: an index page rewritten by
        # many groups is copied (and the database fsynced) once per checkpoint, not once per 1000 frames. Each
        # COMMIT is still fsynced to the WAL (synchronous=FULL): durability does not depend on checkpoints.
        f"PRAGMA wal_autocheckpoint = {max(1000, WAL_AUTOCHECKPOINT_BYTES // page_size)}",
        "PRAGMA cache_size = -16384",  # KiB: keeps the hot index and table pages across groups
        "PRAGMA temp_store = MEMORY",
    )

SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        stream_id TEXT NOT NULL,
        stream_version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        command_id TEXT,
        causation_id TEXT,
        correlation_id TEXT,
        payload BLOB NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL,
        UNIQUE (stream_id, stream_version)
    )""",
    "CREATE INDEX events_command_id ON events (command_id) WHERE command_id IS NOT NULL",
    """CREATE TABLE commands (
        command_id TEXT PRIMARY KEY,
        stream_id TEXT NOT NULL,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL,
        stream_version INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE snapshots (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL,
        head_hash BLOB NOT NULL,
        state BLOB NOT NULL,
        created_at INTEGER NOT NULL
    )""",
]
TRIGGERS: list[str] = []
for _table in ("events", "commands", "meta"):
    for _op in ("UPDATE", "DELETE"):
        TRIGGERS.append(
            f"CREATE TRIGGER IF NOT EXISTS {_table}_no_{_op.lower()} BEFORE {_op} ON {_table} "
            f"BEGIN SELECT RAISE(ABORT, '{_table} is append-only: {_op} refused'); END"
        )
# SQLite's REPLACE conflict resolution deletes the old row without firing a DELETE trigger: refuse any INSERT
# onto an existing key before the conflict is resolved.
_EXISTING = {
    "events": "EXISTS (SELECT 1 FROM events WHERE position = NEW.position) OR EXISTS (SELECT 1 FROM events "
    "WHERE stream_id = NEW.stream_id AND stream_version = NEW.stream_version)",
    "commands": "EXISTS (SELECT 1 FROM commands WHERE command_id = NEW.command_id)",
    "meta": "EXISTS (SELECT 1 FROM meta WHERE key = NEW.key)",
}
for _table, _cond in _EXISTING.items():
    TRIGGERS.append(
        f"CREATE TRIGGER IF NOT EXISTS {_table}_no_replace BEFORE INSERT ON {_table} WHEN {_cond} "
        f"BEGIN SELECT RAISE(ABORT, '{_table} is append-only: INSERT onto an existing row (REPLACE) refused'); END"
    )
TRIGGER_NAMES = frozenset(t.split()[5] for t in TRIGGERS)
SCHEMA.extend(TRIGGERS)
MIGRATE_1_TO_2 = [
    "CREATE INDEX IF NOT EXISTS events_command_id ON events (command_id) WHERE command_id IS NOT NULL",
    *TRIGGERS,
]
MIGRATE_2_TO_3 = [
    # every commit wrote a page of this index; async_read_since searches the position order instead
    "DROP INDEX IF EXISTS events_recorded_at",
]


def migrate(conn: sqlite3.Connection) -> str:
    """Create or check the schema (blocking; call on the connection's thread). Returns the log id."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if tables:
                raise NotALogError("the database has tables but is not an event log (user_version is 0)")
            for stmt in SCHEMA:
                conn.execute(stmt)
            log_id = str(uuid.uuid4())
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("format", FORMAT), ("log_id", log_id), ("schema_version", str(SCHEMA_VERSION))],
            )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
            return log_id
        if version > SCHEMA_VERSION:
            raise NotALogError(
                f"the log has schema version {version}; this library knows up to {SCHEMA_VERSION}"
            )
        read_log_id(conn)
        # version 1 -> 2, and put back any trigger that was dropped (IF NOT EXISTS: no write when all are there)
        for stmt in MIGRATE_1_TO_2:
            conn.execute(stmt)
        if version < 3:
            for stmt in MIGRATE_2_TO_3:
                conn.execute(stmt)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return read_log_id(conn)


FILTER_INDEXES = (
    # what GET /v1/events?correlation= filters on (a job's events); partial: most rows carry neither
    "CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id) WHERE correlation_id IS NOT NULL",
)


def _ensure_filter_indexes(conn: sqlite3.Connection) -> None:
    """Secondary indexes (not part of the log's content or its hash chain), created when missing."""
    if conn.execute("PRAGMA query_only").fetchone()[0]:
        return
    for stmt in FILTER_INDEXES:
        conn.execute(stmt)


def read_log_id(conn: sqlite3.Connection) -> str:
    """The log id of an existing log, or NotALogError."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise NotALogError(f"not an event log: {exc}") from exc
    if meta.get("format") != FORMAT or "log_id" not in meta:
        raise NotALogError("not an event log: the meta table has no log id")
    return str(meta["log_id"])


_ROW_PARAMS = "(?,?,?,?,?,?,?,?,?,?,?,?,?)"
INSERT_CHUNK = 256
"""Rows per multi-row INSERT (13 parameters each: far below SQLite's limit of 32,766 parameters)."""
_INSERT_SQL: dict[int, str] = {}


def _insert_sql(n: int) -> str:
    sql = _INSERT_SQL.get(n)
    if sql is None:
        sql = _INSERT_SQL[n] = f"INSERT INTO events ({COLUMNS}) VALUES " + ",".join([_ROW_PARAMS] * n)
    return sql


def _head_moved(first: int, stored: int) -> EventLogError:
    return EventLogError(
        f"refusing a group that starts at position {first}: the log's head is {stored} (an earlier group "
        "failed, or another process wrote the log); nothing of it was written",
        field="log",
        code="head_moved",
    )


def _commit(conn: sqlite3.Connection, rows: list[Row], commands: list[CommandRow]) -> None:
    """One durable transaction for a whole group, on a connection whose stored head is not known
    (``_commit_known`` reads it first). Command ids live in the chained rows (no `commands` row).

    The rows go in as multi-row INSERTs (one statement per INSERT_CHUNK rows), not one statement per row:
    the sqlite3 module takes the GIL back after every statement step, and while the event loop's thread runs
    Python that wait is up to the interpreter's switch interval (5 ms), so a per-row executemany spent most of
    a group's COMMIT waiting for the GIL.

    The group must start right after the stored head: a group the writer chained onto an earlier one whose
    COMMIT failed (pipelining) is refused, never written with a gap before it. A group of up to INSERT_CHUNK
    rows is one statement (its own transaction: atomic, fsynced at its end under synchronous=FULL); a bigger
    one is an explicit transaction of several.
    """
    _commit_known(conn, rows, None)


def _stored_head(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0])


def _commit_known(conn: sqlite3.Connection, rows: list[Row], head: int | None) -> int:
    """``_commit`` for the write thread, which knows the stored head (`head`; None: not known, read it): the same
    refusals, the head checked here instead of by ``INSERT ... SELECT ... WHERE (SELECT max(position)) = ?`` (a
    plain multi-row INSERT costs ~15 µs less CPU per COMMIT). A row onto a stored one (another process wrote the
    log) is still refused by the database (primary key, unique index, triggers) and reported as ``head_moved``.
    Returns the new stored head."""
    if not rows:
        return _stored_head(conn) if head is None else head
    if head is None:
        head = _stored_head(conn)
    first = rows[0][0]
    if first != head + 1:
        raise _head_moved(first, head)
    try:
        if len(rows) <= INSERT_CHUNK and not conn.in_transaction:
            conn.execute(_insert_sql(len(rows)), [v for row in rows for v in row])  # one statement: atomic
        else:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(rows), INSERT_CHUNK):
                    chunk = rows[i : i + INSERT_CHUNK]
                    conn.execute(_insert_sql(len(chunk)), [v for row in chunk for v in row])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    except sqlite3.IntegrityError as exc:
        stored = _stored_head(conn)
        if stored != head:
            raise _head_moved(first, stored) from exc
        raise
    return int(rows[-1][0])


SNAPSHOT_WRITE_CHUNK = 1 << 20


def _put_snapshot(conn: sqlite3.Connection, name: str, box: list[SnapshotRow]) -> None:
    """Store a snapshot (runs on the write thread), its state written through an incremental blob handle in
    pieces of SNAPSHOT_WRITE_CHUNK: bound as a parameter, SQLite would copy the whole state (megabytes; 140 MiB
    for 100,000 VMs) and keep that copy in the cached statement until the statement ran again, the next
    snapshot. One transaction: a reader (or a crash) sees the old snapshot or the new one whole."""
    position, head_hash, data, created_at = box.pop()
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute(
            "INSERT OR REPLACE INTO snapshots (name, position, head_hash, state, created_at) "
            "VALUES (?,?,?,zeroblob(?),?)",
            (name, position, head_hash, len(data), created_at),
        )
        rowid = cur.lastrowid
        cur.close()
        if rowid is None:
            raise EventLogError("the snapshot row was not written")
        view = memoryview(data)
        with conn.blobopen("snapshots", "state", rowid) as blob:
            for i in range(0, len(view), SNAPSHOT_WRITE_CHUNK):
                blob.write(view[i : i + SNAPSHOT_WRITE_CHUNK])
        view.release()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _lookup(
    conn: sqlite3.Connection, stream_ids: set[str], command_ids: set[str]
) -> tuple[dict[str, int], dict[str, tuple[CommandRow, list[Row]]]]:
    versions: dict[str, int] = {}
    for sid in stream_ids:
        row = conn.execute("SELECT max(stream_version) FROM events WHERE stream_id = ?", (sid,)).fetchone()
        versions[sid] = row[0] or 0
    found: dict[str, tuple[CommandRow, list[Row]]] = {}
    for cid in command_ids:
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM events WHERE command_id = ? ORDER BY position", (cid,)
        ).fetchall()
        if rows:
            cmd, rows = command_from_rows(cid, rows)
            found[cid] = (cmd, rows)
    return versions, found




def _first_recorded_at_or_after(conn: sqlite3.Connection, us: int) -> int:
    """The first position whose recorded_at is >= `us` (past the head if none), by binary search of the position
    order: the writer never lets recorded_at go backwards along the chain (verify checks it), so the log is
    sorted by time too and needs no index of its own for it."""
    lo_hi = conn.execute("SELECT min(position), max(position) FROM events").fetchone()
    if lo_hi[0] is None:
        return 1
    lo, hi = int(lo_hi[0]), int(lo_hi[1]) + 1  # answer in [lo, hi]; hi = past the head
    at = "SELECT position, recorded_at FROM events WHERE position >= ? ORDER BY position LIMIT 1"
    while lo < hi:
        mid = (lo + hi) // 2
        pos, recorded = conn.execute(at, (mid,)).fetchone()  # `mid` <= max(position): a row exists
        if recorded >= us:
            hi = mid
        else:
            lo = pos + 1
    return lo


_Done = Callable[[Any, BaseException | None], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, _Done]


class WriteThread:
    """The log's write connection on a thread of its own: COMMITs and the writer's lookups, in the order they are
    handed over. A job's outcome comes back to the event loop by ONE ``call_soon_threadsafe`` of the caller's
    callback (no future, no task in between: the writer settles a group in that callback).

    Reads go through the store's other connection (aiosqlite's thread); in WAL mode they see every COMMIT done
    here once it returned, and neither waits for the other."""

    def __init__(self, path: Path, pragmas: tuple[str, ...]) -> None:
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._path = path
        self._pragmas = pragmas
        self.conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="events-sqlite-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, loop, done = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the loop; the thread goes on
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for the outcome any more
                pass

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: _Done) -> None:
        """Run ``fn(*args)`` on the thread after everything handed over before; then ``done(result, error)`` on
        the running loop's thread."""
        self._jobs.put((fn, args, asyncio.get_running_loop(), done))

    async def async_run(self, fn: Callable[..., _T], *args: Any) -> _T:
        fut: asyncio.Future[_T] = asyncio.get_running_loop().create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self.submit(fn, args, done)
        return await fut

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            for pragma in self._pragmas:
                conn.execute(pragma)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return conn

    async def async_open(self) -> sqlite3.Connection:
        return await self.async_run(self._open)

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def async_close(self) -> None:
        """Close the connection (after every job handed over before) and end the thread."""
        try:
            await self.async_run(self._close)
        finally:
            self._jobs.put(None)


def create_private(path: Path, mode: int) -> None:
    """Create `path` empty with exactly `mode` (umask ignored) if it does not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _head(conn: sqlite3.Connection, log_id: str) -> tuple[int, bytes, int]:
    row = conn.execute(
        "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, genesis_hash(log_id), 0
    return int(row[0]), bytes(row[1]), int(row[2])


class SQLiteEventStore(EventStore):
    """The event log in a SQLite file. Open with `await SQLiteEventStore.async_open(path)`.

    One process writes a log at a time (the writer's caches assume it).
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        writes: WriteThread,
        path: Path,
        log_id: str,
        head: tuple[int, bytes, int],
        **kw: Any,
    ) -> None:
        super().__init__(
            log_id=log_id, head_position=head[0], head_hash=head[1], last_recorded_us=head[2], **kw
        )
        self._conn = conn  # reads, snapshots (aiosqlite's thread)
        self._writes = writes  # COMMITs and the writer's lookups (a thread and a connection of their own)
        self._stored_head: int | None = head[0]  # the write thread's: the head its last COMMIT left (None: read it)
        self.path = path

    @classmethod
    async def async_open(
        cls,
        path: str | Path,
        upcasters: Upcasters | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        *,
        clock: Clock | None = None,
        subscriber_queue_limit: int = 10_000,
        file_mode: int = FILE_MODE,
    ) -> SQLiteEventStore:
        """Open (creating and migrating if needed) the log at `path`. Raises NotALogError.

        A new file is created with `file_mode` (default 0600) whatever the umask; SQLite gives its -wal and
        -shm files the mode of the database file.
        """
        path = Path(path)
        create_private(path, file_mode)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout = 10000")
            await conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only on a new, empty file
            try:
                mode = await (await conn.execute("PRAGMA journal_mode = WAL")).fetchone()
            except sqlite3.DatabaseError as exc:
                raise NotALogError(f"{path} is not an SQLite database: {exc}") from exc
            if mode is None or str(mode[0]).lower() != "wal":
                raise NotALogError(f"cannot put {path} in WAL mode (got {mode!r})")
            await conn.execute("PRAGMA synchronous = FULL")
            page_size = await (await conn.execute("PRAGMA page_size")).fetchone()
            for pragma in tuning(int(page_size[0]) if page_size else PAGE_SIZE):
                await conn.execute(pragma)
            raw = conn._conn  # the sqlite3 connection; used only through conn._execute (its own thread)
            log_id = await _in_thread(conn, migrate, raw)
            await _in_thread(conn, _ensure_filter_indexes, raw)
            head = await _in_thread(conn, _head, raw, log_id)
            writes = WriteThread(
                path,
                (
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA synchronous = FULL",  # per connection: every COMMIT of this one is fsynced
                    *tuning(int(page_size[0]) if page_size else PAGE_SIZE),
                ),
            )
            try:
                await writes.async_open()
            except BaseException:
                await writes.async_close()
                raise
        except BaseException:
            await conn.close()
            raise
        return cls(
            conn,
            writes,
            path,
            log_id,
            head,
            upcasters=upcasters,
            max_payload_bytes=max_payload_bytes,
            clock=clock,
            subscriber_queue_limit=subscriber_queue_limit,
        )

    writer_pipeline_depth = 2
    """The writer plans the next group while this one commits: commits run in order on the connection's
    thread, and _commit refuses a group that does not start right after the stored head."""

    def _write_conn(self) -> sqlite3.Connection:
        conn = self._writes.conn
        if conn is None:
            raise StoreClosedError("the event store is closed")
        return conn

    def _commit_here(self, rows: list[Row], commands: list[CommandRow]) -> None:
        """On the write thread. The stored head is known after each COMMIT of this connection; after a failure it
        is read again (a COMMIT whose outcome SQLite could not report must not leave a wrong one)."""
        head, self._stored_head = self._stored_head, None
        self._stored_head = _commit_known(self._write_conn(), rows, head)

    async def _async_commit(self, rows: list[Row], commands: list[CommandRow]) -> None:
        await self._writes.async_run(self._commit_here, rows, commands)

    def _start_commit(self, rows: list[Row], commands: list[CommandRow], done: CommitDone) -> bool:
        """Hand the COMMIT to the write thread; `done` is called on the loop once it is settled. False when
        ``_async_commit`` was replaced on this store (a test holding or failing COMMITs): the writer then awaits
        that instead."""
        if "_async_commit" in self.__dict__:
            return False
        self._writes.submit(self._commit_here, (rows, commands), done)
        return True

    def _lookup_here(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, tuple[CommandRow, list[Row]]]]:
        return _lookup(self._write_conn(), stream_ids, command_ids)

    async def _async_lookup(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]:
        versions, found = await self._writes.async_run(self._lookup_here, stream_ids, command_ids)
        results: dict[str, AppendResult] = {}
        for cid, (cmd, rows) in found.items():
            events = tuple(self._rows_to_events(rows))
            results[cid] = AppendResult(events, cmd[3], cmd[4], False)
        return versions, results

    async def _async_read_rows(
        self, kind: str, key: Any, start: int, end: int | None, limit: int | None
    ) -> list[Row]:
        lim = -1 if limit is None else limit
        if kind == "stream":
            sql = (
                f"SELECT {COLUMNS} FROM events WHERE stream_id = ? AND stream_version >= ? "
                "AND stream_version <= ? ORDER BY stream_version LIMIT ?"
            )
            params: tuple[Any, ...] = (key, start, 2**62 if end is None else end, lim)
        elif kind == "position":
            sql = f"SELECT {COLUMNS} FROM events WHERE position >= ? AND position <= ? ORDER BY position LIMIT ?"
            params = (start, 2**62 if end is None else end, lim)
        else:
            first = await _in_thread(self._conn, _first_recorded_at_or_after, self._conn._conn, start)
            # (recorded_at filters too: on a log whose times went backwards, which verify reports, nothing
            # earlier than `start` is served)
            sql = f"SELECT {COLUMNS} FROM events WHERE position >= ? AND recorded_at >= ? ORDER BY position LIMIT ?"
            params = (first, start, lim)
        rows: list[Row] = list(await self._conn.execute_fetchall(sql, params))  # type: ignore[arg-type]
        return rows

    async def async_read_correlated(
        self, correlation_id: str, from_position: int = 1, limit: int | None = None
    ) -> list[StoredEvent]:
        """Indexed (``events_correlation``, made at open when missing; ``events_command_id``)."""
        self._check_range(limit)
        rows = list(
            await self._conn.execute_fetchall(
                f"SELECT {COLUMNS} FROM events WHERE (correlation_id = ? OR command_id = ?) AND position >= ? "
                "ORDER BY position LIMIT ?",
                (correlation_id, correlation_id, max(1, from_position), -1 if limit is None else limit),
            )
        )
        return self._rows_to_events(rows)  # type: ignore[arg-type]

    async def _async_hash_at(self, position: int) -> bytes | None:
        rows = list(
            await self._conn.execute_fetchall("SELECT hash FROM events WHERE position = ?", (position,))
        )
        return bytes(rows[0][0]) if rows else None

    def _put_snapshot_here(self, name: str, box: list[SnapshotRow]) -> None:
        _put_snapshot(self._write_conn(), name, box)

    async def _async_put_snapshot(self, name: str, snapshot: SnapshotRow) -> None:
        # on the write connection too: every write of this process goes through one connection, in order (a
        # second writing connection would wait for the other's lock in busy_timeout's sleeps)
        box = [snapshot]  # emptied on the thread: the write thread keeps its last job's arguments until the next
        await self._writes.async_run(self._put_snapshot_here, name, box)

    async def _async_get_snapshot(self, name: str) -> SnapshotRow | None:
        rows = list(
            await self._conn.execute_fetchall(
                "SELECT position, head_hash, state, created_at FROM snapshots WHERE name = ?", (name,)
            )
        )
        return tuple(rows[0]) if rows else None

    async def async_release_memory(self) -> None:
        """SQLite's ``shrink_memory``: the connection's page cache (up to ``cache_size``) is freed; what is
        needed again is read again."""
        if not self._closed:
            await self._conn.execute("PRAGMA shrink_memory")
            await self._writes.async_run(_shrink, self._writes)

    async def _async_close_backend(self) -> None:
        try:
            await self._writes.async_close()
        finally:
            await self._conn.close()


def _shrink(writes: WriteThread) -> None:
    if writes.conn is not None:
        writes.conn.execute("PRAGMA shrink_memory")
