"""PostgresEventStore: the log in PostgreSQL (asyncpg), for several processes that share one log.

The same API, the same rows and the same hash chain as SQLiteEventStore (a log copied between them verifies
with the same head hash: `python -m events copy`). What PostgreSQL adds:

* The library creates and migrates its schema (tables in one PostgreSQL schema, default ``events``; the
  ``meta`` table holds the format, the log id and the schema version).
* Append-only twice over: triggers refuse UPDATE, DELETE and TRUNCATE of ``events``, ``commands``, ``meta``
  and ``epochs`` for every client, and the daemon's role should hold only SELECT and INSERT on them
  (``grant_statements``; only the owner can drop a trigger).
* Fencing: ``epochs`` is an append-only list of leadership epochs. Once it has a row, every INSERT into
  ``events``/``commands`` is refused by a trigger (SQLSTATE EV001 -> FencedError) unless the transaction
  presents the current epoch; the check and a new epoch's INSERT are serialised by an advisory lock, so a
  deposed writer can never commit after its successor claimed the log (``events.leader``).
* Live subscriptions across processes: each COMMIT sends NOTIFY on the log's channel; a follower task
  LISTENs and reads new rows by position (a poll every ``poll_interval`` seconds covers a lost
  notification), so subscribers of every process see every event once and in order.
* A COMMIT whose connection dies is looked up after reconnecting (by the hash of its first row), so the
  caller learns the real outcome whenever the database can tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg

from .aio import async_wait_event
from .chain import check_rows, genesis_hash
from .envelope import AppendResult, StoredEvent
from .errors import EventLogError, FencedError, LogIntegrityError, NotALogError
from .store import DEFAULT_MAX_PAYLOAD_BYTES, Clock, EventStore, SnapshotRow
from .upcast import Upcasters
from .writer import CommandRow, Row, command_from_rows

SCHEMA_VERSION = 1
FORMAT = "events.log"
DEFAULT_SCHEMA = "events"
FENCED_SQLSTATE = "EV001"
APPEND_ONLY_SQLSTATE = "EV002"
COLUMN_NAMES = (
    "position",
    "stream_id",
    "stream_version",
    "event_type",
    "schema_version",
    "recorded_at",
    "actor",
    "command_id",
    "causation_id",
    "correlation_id",
    "payload",
    "prev_hash",
    "hash",
)
COLUMNS = ", ".join(COLUMN_NAMES)
COMMAND_NAMES = ("command_id", "stream_id", "first_position", "last_position", "stream_version")
APPEND_ONLY_TABLES = ("events", "commands", "meta", "epochs")


def is_dsn(target: object) -> bool:
    """True for a PostgreSQL connection string (postgresql://... or postgres://...)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def lock_key(purpose: str, name: str) -> int:
    """A signed 64-bit advisory lock key for `purpose` on the log (or schema) `name`."""
    return int.from_bytes(
        hashlib.sha256(f"events.{purpose}:{name}".encode()).digest()[:8], "big", signed=True
    )


def quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"bad SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def channel_name(log_id: str) -> str:
    return "events_" + log_id.replace("-", "")


def schema_ddl(schema: str, log_id: str) -> list[str]:
    """The statements that create a log's tables, triggers and functions in `schema`."""
    s = quote_ident(schema)
    epoch_lock = lock_key("epoch", log_id)
    ddl = [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE {s}.events (
            position bigint PRIMARY KEY CHECK (position >= 1),
            stream_id text NOT NULL,
            stream_version bigint NOT NULL CHECK (stream_version >= 1),
            event_type text NOT NULL,
            schema_version integer NOT NULL,
            recorded_at bigint NOT NULL,
            actor text NOT NULL,
            command_id text,
            causation_id text,
            correlation_id text,
            payload bytea NOT NULL,
            prev_hash bytea NOT NULL,
            hash bytea NOT NULL,
            UNIQUE (stream_id, stream_version)
        )""",
        # no index on recorded_at (an index entry per row: WAL per event 416 -> 350 bytes without it, and some
        # server CPU): reads by time binary-search the position order instead (_async_first_position_at). Logs
        # created before keep theirs (harmless).
        # idempotency is read from the chained rows (as in SQLite); `commands` adds a unique guard
        f"CREATE INDEX events_command_id ON {s}.events (command_id) WHERE command_id IS NOT NULL",
        f"""CREATE TABLE {s}.commands (
            command_id text PRIMARY KEY,
            stream_id text NOT NULL,
            first_position bigint NOT NULL,
            last_position bigint NOT NULL,
            stream_version bigint NOT NULL
        )""",
        f"""CREATE TABLE {s}.snapshots (
            name text PRIMARY KEY,
            position bigint NOT NULL,
            head_hash bytea NOT NULL,
            state bytea NOT NULL,
            created_at bigint NOT NULL
        )""",
        f"""CREATE TABLE {s}.epochs (
            epoch bigint PRIMARY KEY CHECK (epoch >= 1),
            holder text NOT NULL,
            claimed_at bigint NOT NULL
        )""",
        f"""CREATE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = '{APPEND_ONLY_SQLSTATE}';
        END $$""",
        # Runs once per INSERT statement into events/commands. The shared advisory lock serialises this check
        # with the INSERT of a new epoch (which takes the lock exclusively), and each statement of a volatile
        # plpgsql function sees a fresh snapshot: once a new epoch is committed no older writer passes here.
        f"""CREATE FUNCTION {s}.check_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            cur bigint;
            mine text;
        BEGIN
            PERFORM pg_advisory_xact_lock_shared({epoch_lock});
            SELECT max(epoch) INTO cur FROM {s}.epochs;
            IF cur IS NULL THEN
                RETURN NULL;
            END IF;
            mine := coalesce(current_setting('events.epoch', true), '');
            IF mine = '' OR mine::bigint <> cur THEN
                RAISE EXCEPTION 'fenced: the log is at epoch %, this writer holds epoch %', cur,
                    CASE WHEN mine = '' THEN 'none' ELSE mine END
                    USING ERRCODE = '{FENCED_SQLSTATE}';
            END IF;
            RETURN NULL;
        END $$""",
        # One group in one statement (one round trip, its own transaction when called outside one): the epoch
        # it presents, the rows, the command ids, and the NOTIFY that wakes the followers at COMMIT.
        f"""CREATE FUNCTION {s}.append_group(
            epoch text, chan text, last_pos bigint,
            p bigint[], sid text[], sv bigint[], et text[], scv integer[], rat bigint[], act text[],
            cid text[], caus text[], corr text[], pay bytea[], prev bytea[], h bytea[],
            c_id text[], c_sid text[], c_first bigint[], c_last bigint[], c_ver bigint[]
        ) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM set_config('events.epoch', epoch, true);
            INSERT INTO {s}.events ({COLUMNS})
                SELECT * FROM unnest(p, sid, sv, et, scv, rat, act, cid, caus, corr, pay, prev, h);
            IF cardinality(c_id) > 0 THEN
                INSERT INTO {s}.commands ({", ".join(COMMAND_NAMES)})
                    SELECT * FROM unnest(c_id, c_sid, c_first, c_last, c_ver);
            END IF;
            PERFORM pg_notify(chan, last_pos::text);
        END $$""",
    ]
    for table in APPEND_ONLY_TABLES:
        ddl.append(
            f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {s}.{table} "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change()"
        )
        ddl.append(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {s}.{table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change()"
        )
    for table in ("events", "commands"):
        ddl.append(
            f"CREATE TRIGGER {table}_epoch BEFORE INSERT ON {s}.{table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.check_epoch()"
        )
    return ddl


def grant_statements(role: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """What the log's owner runs so that `role` (the daemon's) may append and read but never rewrite."""
    s = quote_ident(schema)
    r = quote_ident(role)
    tables = ", ".join(f"{s}.{t}" for t in APPEND_ONLY_TABLES)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r}",
        f"REVOKE ALL ON {tables}, {s}.snapshots FROM {r}",
        f"GRANT SELECT, INSERT ON {tables} TO {r}",
        f"GRANT SELECT, INSERT, UPDATE ON {s}.snapshots TO {r}",
    ]


async def async_migrate(
    conn: asyncpg.Connection, schema: str = DEFAULT_SCHEMA, *, create: bool = True, log_id: str | None = None
) -> str:
    """Create (if absent and `create`) or check the log's schema; returns its log id. Raises NotALogError."""
    s = quote_ident(schema)
    encoding = await conn.fetchval("SHOW server_encoding")
    if str(encoding).upper() not in ("UTF8", "UTF-8"):
        raise NotALogError(f"the database's encoding is {encoding}; an event log needs UTF8")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("migrate", schema))
        meta_table = await conn.fetchval("SELECT to_regclass($1)::text", f"{s}.meta")
        if meta_table is None:
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema)
            if tables:
                raise NotALogError(f"schema {schema!r} has tables but is not an event log (no meta table)")
            if not create:
                raise NotALogError(f"schema {schema!r} holds no event log")
            new_id = log_id or str(uuid.uuid4())
            try:
                for stmt in schema_ddl(schema, new_id):
                    await conn.execute(stmt)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise NotALogError(
                    f"schema {schema!r} holds no event log and this role may not create one ({exc}); the "
                    "database owner creates it: python -m events pg-init DSN --schema SCHEMA --grant ROLE"
                ) from exc
            await conn.executemany(
                f"INSERT INTO {s}.meta (key, value) VALUES ($1, $2)",
                [("format", FORMAT), ("log_id", new_id), ("schema_version", str(SCHEMA_VERSION))],
            )
            return new_id
        meta = {r[0]: r[1] for r in await conn.fetch(f"SELECT key, value FROM {s}.meta")}
    if meta.get("format") != FORMAT or "log_id" not in meta:
        raise NotALogError(f"schema {schema!r} is not an event log: its meta table has no log id")
    version = int(meta.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise NotALogError(f"the log has schema version {version}; this library knows up to {SCHEMA_VERSION}")
    if log_id is not None and meta["log_id"] != log_id:
        raise NotALogError(f"schema {schema!r} already holds another log ({meta['log_id']})")
    return str(meta["log_id"])


async def async_claim_epoch(
    conn: asyncpg.Connection, log_id: str, holder: str, schema: str = DEFAULT_SCHEMA
) -> int:
    """Record a new epoch (one more than the highest) for `holder`; from its COMMIT on, only writers that
    present it may append. Waits for in-flight appends of older epochs to finish first."""
    s = quote_ident(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("epoch", log_id))
        epoch = await conn.fetchval(
            f"INSERT INTO {s}.epochs (epoch, holder, claimed_at) "
            f"SELECT coalesce(max(epoch), 0) + 1, $1, $2 FROM {s}.epochs RETURNING epoch",
            holder,
            time.time_ns() // 1000,
        )
    return int(epoch)


def connection_lost(exc: BaseException) -> bool:
    """True when `exc` means the connection (not the statement) failed: the outcome of a COMMIT is unknown."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, asyncpg.PostgresConnectionError):
        return str(getattr(exc, "sqlstate", "") or "").startswith(("08", "57P"))
    return isinstance(
        exc,
        OSError
        | ConnectionError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError  # a connection whose server went away while it was idle
        | asyncpg.PostgresConnectionError
        | TimeoutError,
    )


def _fenced(exc: BaseException) -> FencedError | None:
    if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) == FENCED_SQLSTATE:
        return FencedError(str(getattr(exc, "message", exc)))
    return None


class PostgresEventStore(EventStore):
    """The event log in a PostgreSQL schema. Open with `await PostgresEventStore.async_open(dsn)`.

    One process writes at a time: several may open the same log, but appends need the current fencing epoch
    once the log has one (`async_adopt_epoch`, see events.leader); the others read and subscribe.
    """

    writer_pipeline_depth = 2  # the writer plans group N+1 while N commits; _async_commit keeps their order

    def __init__(
        self,
        dsn: str,
        schema: str,
        pool: asyncpg.Pool,
        log_id: str,
        head: tuple[int, bytes, int],
        *,
        poll_interval: float,
        application_name: str,
        command_timeout: float = 30.0,
        **kw: Any,
    ) -> None:
        super().__init__(
            log_id=log_id, head_position=head[0], head_hash=head[1], last_recorded_us=head[2], **kw
        )
        self.dsn = dsn
        self.schema = schema
        self.channel = channel_name(log_id)
        self.poll_interval = poll_interval
        self.application_name = application_name
        self.command_timeout = command_timeout
        self._pool = pool
        self._wconn: asyncpg.Connection | None = None
        self._epoch: int | None = None
        self._published = head[0]  # highest position handed to subscribers
        # groups are committed one at a time, in the order the writer handed them over (it plans group N+1
        # while N commits: writer_pipeline_depth); a group must link onto the last row stored: its position
        # and hash (None: unknown, ask the database)
        self._commit_lock = asyncio.Lock()
        self._stored_head: tuple[int, bytes] | None = (head[0], head[1])
        self._follower: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        s = quote_ident(schema)
        self._s = s
        self._sql_stream = (
            f"SELECT {COLUMNS} FROM {s}.events WHERE stream_id = $1 AND stream_version >= $2 "
            "AND stream_version <= $3 ORDER BY stream_version LIMIT $4"
        )
        self._sql_position = f"SELECT {COLUMNS} FROM {s}.events WHERE position >= $1 AND position <= $2 ORDER BY position LIMIT $3"
        # (recorded_at filters too: on a log whose times went backwards, which verify reports, nothing earlier
        # than the time asked for is served)
        self._sql_since = (
            f"SELECT {COLUMNS} FROM {s}.events WHERE position >= $1 AND recorded_at >= $2 ORDER BY position "
            "LIMIT $3"
        )
        self._sql_at = f"SELECT position, recorded_at FROM {s}.events WHERE position >= $1 ORDER BY position LIMIT 1"
        self._notify_channel = quote_ident(self.channel)

    @classmethod
    async def async_open(
        cls,
        dsn: str,
        upcasters: Upcasters | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        *,
        schema: str = DEFAULT_SCHEMA,
        create: bool = True,
        clock: Clock | None = None,
        subscriber_queue_limit: int = 10_000,
        poll_interval: float = 1.0,
        pool_size: int = 4,
        application_name: str = "events",
        command_timeout: float = 30.0,
    ) -> PostgresEventStore:
        """Open (creating and migrating if `create`) the log in `schema` of the database at `dsn`.

        Raises NotALogError (not a log, unknown version, not UTF8) or asyncpg's connection errors.
        """
        if not is_dsn(dsn):
            raise NotALogError(f"not a PostgreSQL connection string: {dsn!r} (postgresql://...)")
        settings = {"application_name": application_name}
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max(1, pool_size),
            server_settings=settings,
            command_timeout=command_timeout,
        )
        try:
            async with pool.acquire() as conn:
                log_id = await async_migrate(conn, schema, create=create)
                head = await _async_head(conn, quote_ident(schema), log_id)
        except BaseException:
            await pool.close()
            raise
        return cls(
            dsn,
            schema,
            pool,
            log_id,
            head,
            poll_interval=poll_interval,
            application_name=application_name,
            command_timeout=command_timeout,
            upcasters=upcasters,
            max_payload_bytes=max_payload_bytes,
            clock=clock,
            subscriber_queue_limit=subscriber_queue_limit,
        )

    # ---- fencing -----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int | None:
        """The fencing epoch this store presents with its appends (None: none)."""
        return self._epoch

    def adopt_epoch(self, epoch: int | None) -> None:
        """Present `epoch` with every later append (after claiming it: events.postgres.async_claim_epoch).
        The next group first reloads the head and forgets the writer's caches: others may have written."""
        self._epoch = epoch
        self._mark_stale()

    async def async_current_epoch(self) -> tuple[int, str, int] | None:
        """(epoch, holder, claimed_at_us) of the log's current epoch, or None."""
        self._check_open()
        row = await self._async_q(
            "fetchrow", f"SELECT epoch, holder, claimed_at FROM {self._s}.epochs ORDER BY epoch DESC LIMIT 1"
        )
        return None if row is None else (int(row[0]), str(row[1]), int(row[2]))

    @property
    def head_is_current(self) -> bool:
        """False when this process's writer has to reload the head before its next group (it took over, or a
        COMMIT's outcome was unknown): `async_head` may then be older than the stored head."""
        return not self._writer.stale

    async def async_stored_head(self) -> tuple[int, bytes]:
        """The head as stored (the writer's head is only this process's view)."""
        self._check_open()
        pos, h, _ = await self._async_load_head()
        return pos, h

    async def async_verify_range(
        self, after_position: int, after_hash: bytes, to_position: int | None = None, *, page: int = 5000
    ) -> tuple[int, bytes]:
        """Recompute the stored rows after `after_position` (whose hash `after_hash` the caller vouches for: the
        genesis hash, a signed checkpoint, a sealed snapshot, an earlier call) up to `to_position` (default: the
        end), a page at a time, the hashing on a thread. Returns (last position, its hash); raises
        LogIntegrityError at the first row that does not follow, link or hash, or if the log ends before
        `to_position`. What the daemon runs at start and before it signs (events.verify_chain_range on a file)."""
        self._check_open()
        end = 2**62 if to_position is None else to_position
        position, last = after_position, after_hash
        while position < end:
            rows = await self._async_q("fetch", self._sql_position, position + 1, end, page)
            if not rows:
                break
            position, last = await asyncio.to_thread(check_rows, rows, position, last)
            if len(rows) < page:
                break
        if to_position is not None and position < to_position:
            raise LogIntegrityError(
                f"the log ends at position {position}, before position {to_position}",
                position=position + 1,
                kind="truncated",
            )
        return position, last

    # ---- backend hooks -------------------------------------------------------------------------------------
    async def _async_q(self, method: str, sql: str, *args: Any) -> Any:
        """One query on a pooled connection; a connection lost (terminated, server restarted) is replaced and
        the query, which writes nothing or replaces a snapshot, is tried once more."""
        try:
            return await getattr(self._pool, method)(sql, *args)
        except Exception as exc:
            if self._closed or not connection_lost(exc):
                raise
        return await getattr(self._pool, method)(sql, *args)

    async def _async_write_conn(self) -> asyncpg.Connection:
        conn = self._wconn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                self.dsn,
                server_settings={"application_name": self.application_name},
                command_timeout=self.command_timeout,  # a partitioned database: outcome looked up, not awaited forever
            )
            self._wconn = conn
        return conn

    async def _async_drop_write_conn(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            conn.terminate()

    def _mark_stale(self) -> None:
        """Others may have written the log (or our last outcome is unknown): the writer reloads the head before
        its next group, and the next commit asks the database where the log ends."""
        self._writer.stale = True
        self._stored_head = None

    async def _async_commit(self, rows: list[Row], commands: list[CommandRow]) -> None:
        """Commit one group after the ones handed over before it. A group that does not link onto the last stored
        row (the group before it failed: it was planned on top of it) is refused, unwritten."""
        async with self._commit_lock:
            if self._stored_head is None:
                self._stored_head = (await self._async_load_head())[:2]
            position, link = self._stored_head
            if rows[0][0] != position + 1 or rows[0][11] != link:
                raise EventLogError(
                    f"refusing a group that starts at position {rows[0][0]}: it does not link onto the log's "
                    f"head (position {position}; an earlier group failed, or another process wrote the log); "
                    "nothing of it was written",
                    field="log",
                    code="head_moved",
                )
            try:
                await self._async_commit_once(rows, commands)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                # the connection died and the rows are not stored: one more try on a new connection (a COMMIT
                # of the lost one arriving late could not write twice: the positions are the primary key)
                await self._async_commit_once(rows, commands)
            self._stored_head = (rows[-1][0], rows[-1][12])

    async def _async_commit_once(self, rows: list[Row], commands: list[CommandRow]) -> None:
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._async_write_conn()
            await self._async_copy_group(conn, rows, commands)
        except BaseException as exc:
            if (
                isinstance(exc, asyncpg.PostgresError)
                and not connection_lost(exc)
                and conn is not None
                and not conn.is_closed()
                and conn.is_in_transaction()
            ):
                # a refused group (fenced, duplicate) on a live connection: end its transaction
                try:
                    await conn.execute("ROLLBACK")
                except Exception:
                    await self._async_drop_write_conn()
            fenced = _fenced(exc)
            if fenced is not None:
                raise fenced from exc
            if isinstance(exc, asyncpg.UniqueViolationError):
                self._mark_stale()  # someone else wrote the log: reload before the next group
                raise
            if isinstance(exc, asyncio.CancelledError):  # the transaction dies with its connection
                self._mark_stale()
                await self._async_drop_write_conn()
            elif connection_lost(exc):
                await self._async_drop_write_conn()
                if await self._async_was_committed(rows):
                    return
            raise

    async def _async_copy_group(
        self, conn: asyncpg.Connection, rows: list[Row], commands: list[CommandRow]
    ) -> None:
        """One group, one transaction, one round trip: a single query message ``BEGIN; SET LOCAL events.epoch;
        COPY events FROM STDIN (FORMAT binary); NOTIFY; COMMIT`` followed at once by the rows' binary COPY data
        (asyncpg's own encoders). A group with command ids takes two: the second message copies the ``commands``
        rows, then NOTIFY and COMMIT. If any statement fails, PostgreSQL skips the rest of the message (the
        COMMIT too) and drops the COPY data it has not read: the transaction is left failed, never committed
        (the caller rolls it back). Every literal in the SQL is an integer or the log's own channel name."""
        epoch = "" if self._epoch is None else str(int(self._epoch))
        begin = f"BEGIN; SET LOCAL events.epoch = '{epoch}'"
        end = f"NOTIFY {self._notify_channel}, '{int(rows[-1][0])}'; COMMIT"
        if not commands:
            await _async_copy_in(conn, self.schema, "events", COLUMN_NAMES, rows, before=begin, after=end)
            return
        await _async_copy_in(conn, self.schema, "events", COLUMN_NAMES, rows, before=begin)
        await _async_copy_in(conn, self.schema, "commands", COMMAND_NAMES, commands, after=end)

    async def _async_was_committed(self, rows: list[Row]) -> bool:
        """After a COMMIT on a lost connection: is its first row stored with its hash? (Unknown: raise.)"""
        self._mark_stale()
        try:
            stored = await asyncio.wait_for(
                self._async_q(
                    "fetchval", f"SELECT hash FROM {self._s}.events WHERE position = $1", rows[0][0]
                ),
                30,
            )
        except Exception as exc:
            raise EventLogError(
                "the connection to PostgreSQL was lost during COMMIT and the database cannot be asked whether "
                f"it was written ({type(exc).__name__}: {exc}); look the command id up once it is back",
                code="outcome_unknown",
            ) from exc
        return stored is not None and bytes(stored) == rows[0][12]

    async def _async_load_head(self) -> tuple[int, bytes, int]:
        try:
            async with self._pool.acquire() as conn:
                return await _async_head(conn, self._s, self.log_id)
        except Exception as exc:
            if not connection_lost(exc):
                raise
        async with self._pool.acquire() as conn:
            return await _async_head(conn, self._s, self.log_id)

    async def _async_lookup(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]:
        try:
            return await self._async_lookup_once(stream_ids, command_ids)
        except Exception as exc:
            if not connection_lost(exc):
                raise
        return await self._async_lookup_once(stream_ids, command_ids)

    async def _async_lookup_once(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]:
        versions: dict[str, int] = {}
        results: dict[str, AppendResult] = {}
        async with self._pool.acquire() as conn:
            if stream_ids:
                for sid, v in await conn.fetch(
                    f"SELECT stream_id, max(stream_version) FROM {self._s}.events "
                    "WHERE stream_id = ANY($1::text[]) GROUP BY stream_id",
                    list(stream_ids),
                ):
                    versions[sid] = int(v)
            if command_ids:
                rows = await conn.fetch(
                    f"SELECT {COLUMNS} FROM {self._s}.events WHERE command_id = ANY($1::text[]) ORDER BY position",
                    list(command_ids),
                )
                by_id: dict[str, list[Row]] = {}
                for r in rows:
                    by_id.setdefault(r[7], []).append(tuple(r))
                for cid, cid_rows in by_id.items():
                    cmd, run = command_from_rows(cid, cid_rows)
                    events = tuple(self._rows_to_events(run))
                    results[cid] = AppendResult(events, int(cmd[3]), int(cmd[4]), False)
        return versions, results

    async def _async_read_rows(
        self, kind: str, key: Any, start: int, end: int | None, limit: int | None
    ) -> list[Row]:
        big = 2**62
        if kind == "stream":
            rows = await self._async_q(
                "fetch", self._sql_stream, key, start, big if end is None else end, limit
            )
        elif kind == "position":
            rows = await self._async_q("fetch", self._sql_position, start, big if end is None else end, limit)
        else:
            first = await self._async_first_position_at(start)
            rows = await self._async_q("fetch", self._sql_since, first, start, limit)
        return [tuple(r) for r in rows]

    async def _async_first_position_at(self, us: int) -> int:
        """The first position whose recorded_at is >= `us` (past the head if none), by binary search of the
        position order: the writer never lets recorded_at go backwards along the chain (verify checks it), so
        the log is sorted by time too and needs no index of its own for it (as the SQLite store)."""
        lo_hi = await self._async_q("fetchrow", f"SELECT min(position), max(position) FROM {self._s}.events")
        if lo_hi is None or lo_hi[0] is None:
            return 1
        lo, hi = int(lo_hi[0]), int(lo_hi[1]) + 1  # answer in [lo, hi]; hi = past the head
        while lo < hi:
            mid = (lo + hi) // 2
            pos, recorded = await self._async_q("fetchrow", self._sql_at, mid)  # mid <= max(position): a row
            if recorded >= us:
                hi = mid
            else:
                lo = int(pos) + 1
        return lo

    async def _async_hash_at(self, position: int) -> bytes | None:
        h = await self._async_q(
            "fetchval", f"SELECT hash FROM {self._s}.events WHERE position = $1", position
        )
        return None if h is None else bytes(h)

    async def _async_put_snapshot(self, name: str, snapshot: SnapshotRow) -> None:
        await self._async_q(
            "execute",
            f"INSERT INTO {self._s}.snapshots (name, position, head_hash, state, created_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, "
            "head_hash = EXCLUDED.head_hash, state = EXCLUDED.state, created_at = EXCLUDED.created_at",
            name,
            *snapshot,
        )

    async def _async_get_snapshot(self, name: str) -> SnapshotRow | None:
        row = await self._async_q(
            "fetchrow",
            f"SELECT position, head_hash, state, created_at FROM {self._s}.snapshots WHERE name = $1",
            name,
        )
        return None if row is None else (int(row[0]), bytes(row[1]), bytes(row[2]), int(row[3]))

    async def _async_close_backend(self) -> None:
        task, self._follower = self._follower, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._wconn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._wconn.close(), 5)
            self._wconn = None
        try:
            await asyncio.wait_for(self._pool.close(), 10)
        except (TimeoutError, Exception):
            self._pool.terminate()

    # ---- live subscriptions across processes ---------------------------------------------------------------
    def _register(self, sub: Any) -> None:
        super()._register(sub)
        if self._follower is None and not self._closed:
            self._follower = asyncio.get_running_loop().create_task(
                self._async_follow(), name="events-follower"
            )

    def _publish(self, events: list[StoredEvent]) -> None:
        """Hand committed events (of this process's writer, or read by the follower) to subscribers once each.
        A subscriber that sees a gap reads it from the store (events.subscription)."""
        last = self._published
        if not events or events[-1].position <= last:
            return
        if events[0].position <= last:
            events = [e for e in events if e.position > last]
        self._published = events[-1].position
        super()._publish(events)

    async def _async_follow(self) -> None:
        """LISTEN for other processes' commits and read them by position (a timed poll covers lost NOTIFYs)."""
        backoff = 0.1
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, server_settings={"application_name": self.application_name + "-listen"}
                )
                await conn.add_listener(self.channel, self._on_notify)
                conn.add_termination_listener(lambda _c: self._poke.set())
                backoff = 0.1
                self._poke.set()  # (re)connected: read whatever committed meanwhile
                while not self._closed:
                    await async_wait_event(self._poke, self.poll_interval)
                    self._poke.clear()
                    await self._async_pump()
                    if conn.is_closed():
                        break
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if conn is not None:
                    conn.terminate()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            if int(payload) <= self._published:  # our own commit, already handed out: nothing to read
                return
        except ValueError:
            pass
        self._poke.set()

    async def _async_pump(self, batch: int = 1000) -> None:
        while not self._closed:
            start = self._published + 1
            rows = await self._async_read_rows("position", None, start, None, batch)
            if not rows:
                return
            self._publish(self._rows_to_events(rows))
            if len(rows) < batch:
                return

    async def async_catch_up(self) -> int:
        """Hand subscribers everything committed so far (by any process); returns the position reached."""
        self._check_open()
        await self._async_pump()
        return self._published


def _protocol_copy_in(conn: asyncpg.Connection) -> Any:
    """asyncpg's protocol-level COPY FROM STDIN (private: None if this asyncpg has none)."""
    return getattr(getattr(conn, "_protocol", None), "copy_in", None)


async def _async_copy_in(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    columns: tuple[str, ...],
    records: list[Any],
    *,
    before: str = "",
    after: str = "",
) -> None:
    """``before; COPY schema.table (columns) FROM STDIN (FORMAT binary); after`` as ONE query message, the
    records' binary COPY data sent right behind it: one round trip. This is what asyncpg's
    ``Connection.copy_records_to_table`` does (the columns' encoders come from a prepared, cached statement
    selecting them), with our own statements around the COPY; an asyncpg without that protocol method gets
    the same statements through its public API, in three round trips."""
    copy_in = _protocol_copy_in(conn)
    if copy_in is None:
        if before:
            await conn.execute(before)
        await conn.copy_records_to_table(table, records=records, columns=columns, schema_name=schema)
        if after:
            await conn.execute(after)
        return
    s = quote_ident(schema)
    cols = ", ".join(columns)
    prepared = await conn._prepare(f"SELECT {cols} FROM {s}.{table} LIMIT 1", use_cache=True)
    sql = f"COPY {s}.{table} ({cols}) FROM STDIN (FORMAT binary)"
    if before:
        sql = f"{before}; {sql}"
    if after:
        sql = f"{sql}; {after}"
    await copy_in(sql, None, None, records, prepared._state, None)


async def _async_head(conn: asyncpg.Connection, s: str, log_id: str) -> tuple[int, bytes, int]:
    row = await conn.fetchrow(
        f"SELECT position, hash, recorded_at FROM {s}.events ORDER BY position DESC LIMIT 1"
    )
    if row is None:
        return 0, genesis_hash(log_id), 0
    return int(row[0]), bytes(row[1]), int(row[2])


async def async_insert_rows(
    conn: asyncpg.Connection, schema: str, rows: Iterable[Row], commands: Iterable[CommandRow] = ()
) -> None:
    """Copy rows exactly as given (events.copy), in one transaction (no epoch: for a log that has none)."""
    async with conn.transaction():
        await conn.copy_records_to_table(
            "events", records=list(rows), columns=COLUMN_NAMES, schema_name=schema
        )
        cmds = list(commands)
        if cmds:
            await conn.copy_records_to_table(
                "commands", records=cmds, columns=COMMAND_NAMES, schema_name=schema
            )


async def async_pg_init(
    dsn: str, schema: str = DEFAULT_SCHEMA, grant: str | None = None
) -> tuple[str, list[str]]:
    """Create (or check) the log in `schema` as the connecting role (its owner) and, with `grant`, give that
    role SELECT and INSERT only. Returns (log id, the GRANT statements run)."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "events-init"})
    try:
        log_id = await async_migrate(conn, schema, create=True)
        statements = grant_statements(grant, schema) if grant else []
        for stmt in statements:
            await conn.execute(stmt)
    finally:
        await conn.close()
    return log_id, statements
