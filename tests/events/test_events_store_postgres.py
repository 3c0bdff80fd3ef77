"""The PostgreSQL store against a real PostgreSQL server (the session fixture `pg_server`)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events import (
    EventStore,
    FencedError,
    LogIntegrityError,
    MemoryEventStore,
    NewEvent,
    NotALogError,
    SQLiteEventStore,
    StoredEvent,
    verify,
)
from events import postgres as pg_module
from events.chain import genesis_hash
from events.postgres import PostgresEventStore, async_claim_epoch, grant_statements
from moldlab.testing.pgserver import PgServer
from tests.events.store_contract import StoreContract, ev, hold_writer_before_commit

_schemas = itertools.count(1)


def new_schema() -> str:
    return f"t{next(_schemas)}"


async def open_pg(pg: PgServer, schema: str, **kw: Any) -> PostgresEventStore:
    return await PostgresEventStore.async_open(pg.dsn(), schema=schema, **kw)


class TestPostgresEventStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _server(self, pg_server: PgServer) -> None:
        self.pg = pg_server

    async def make_store(self, **kw: Any) -> EventStore:
        return await open_pg(self.pg, new_schema(), **kw)


class TestPostgresEventStoreWithoutProtocolCopy(TestPostgresEventStore):
    """The same contract when asyncpg offers no protocol-level COPY: a group is then BEGIN, COPY, NOTIFY + COMMIT
    as separate statements through asyncpg's public API."""

    @pytest.fixture(autouse=True)
    def _public_copy(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pg_module, "_protocol_copy_in", lambda conn: None)


async def test_rows_cannot_be_changed_even_by_the_owner(pg_server: PgServer) -> None:
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    await store.async_append("s", [ev()], command_id="c")
    await store.async_close()
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        await async_claim_epoch(conn, store.log_id, "a", schema)
        for sql in (
            "UPDATE {s}.events SET payload = '\\x00'",
            "DELETE FROM {s}.events",
            "TRUNCATE {s}.events",
            "UPDATE {s}.commands SET stream_id = 'x'",
            "DELETE FROM {s}.commands",
            "TRUNCATE {s}.commands",
            "UPDATE {s}.meta SET value = 'x' WHERE key = 'log_id'",
            "DELETE FROM {s}.meta",
            "UPDATE {s}.epochs SET holder = 'b'",
            "DELETE FROM {s}.epochs",
            "TRUNCATE {s}.epochs",
        ):
            with pytest.raises(asyncpg.PostgresError, match="append-only") as info:
                await conn.execute(sql.format(s=schema))
            assert info.value.sqlstate == "EV002"
    finally:
        await conn.close()


async def test_the_daemon_role_may_append_but_has_no_update_delete_truncate(pg_server: PgServer) -> None:
    schema = new_schema()
    await (await open_pg(pg_server, schema)).async_close()  # the owner creates the log
    role = f"daemon_{schema}"
    pg_server.psql(f"CREATE ROLE {role} LOGIN")
    for stmt in grant_statements(role, schema):
        pg_server.psql(stmt)
    store = await PostgresEventStore.async_open(pg_server.dsn(user=role), schema=schema, create=False)
    res = await store.async_append("s", [ev(), ev()], command_id="c")
    assert res.last_position == 2
    await store.async_save_snapshot("snap", 2, {"n": 2})
    await store.async_save_snapshot("snap", 2, {"n": 3})  # snapshots may be replaced
    assert (await store.async_load_snapshot("snap")).state == {"n": 3}  # type: ignore[union-attr]
    await store.async_close()
    conn = await asyncpg.connect(pg_server.dsn(user=role))
    try:
        for sql in (
            "UPDATE {s}.events SET payload = '\\x00'",
            "DELETE FROM {s}.events",
            "TRUNCATE {s}.events",
            "UPDATE {s}.commands SET stream_id = 'x'",
            "DELETE FROM {s}.commands",
            "TRUNCATE {s}.meta",
            "DELETE FROM {s}.epochs",
            "DROP TRIGGER events_no_change ON {s}.events",
            "ALTER TABLE {s}.events DISABLE TRIGGER ALL",
            "DROP TABLE {s}.events",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql.format(s=schema))
    finally:
        await conn.close()
    with pytest.raises(NotALogError):  # nor can it create a log where it has no rights
        await PostgresEventStore.async_open(pg_server.dsn(user=role), schema=new_schema())


async def test_reopened_log_continues_the_chain_and_keeps_command_ids(pg_server: PgServer) -> None:
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    first = await store.async_append("s", [ev(), ev()], command_id="c1")
    log_id = store.log_id
    await store.async_close()
    store = await open_pg(pg_server, schema)
    assert store.log_id == log_id
    assert (await store.async_append("s", [ev()], command_id="c1")).events == first.events
    res = await store.async_append("s", [ev()], expected_version=2)
    assert res.last_position == 3 and res.events[0].prev_hash == first.events[-1].hash
    await store.async_close()


async def test_a_foreign_schema_or_a_newer_version_is_refused(pg_server: PgServer) -> None:
    schema = new_schema()
    pg_server.psql(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.other (x int)")
    with pytest.raises(NotALogError, match="not an event log"):
        await open_pg(pg_server, schema)
    schema = new_schema()
    await (await open_pg(pg_server, schema)).async_close()
    pg_server.psql(f"ALTER TABLE {schema}.meta DISABLE TRIGGER USER")
    pg_server.psql(f"UPDATE {schema}.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(NotALogError, match="schema version 99"):
        await open_pg(pg_server, schema)
    with pytest.raises(NotALogError):
        await open_pg(pg_server, new_schema(), create=False)
    with pytest.raises(NotALogError):
        await PostgresEventStore.async_open("/var/lib/x.db")  # type: ignore[arg-type]


async def test_memory_and_postgres_build_the_same_chain(pg_server: PgServer) -> None:
    pgs = await open_pg(pg_server, new_schema(), clock=lambda: 1_700_000_000_000_000)
    mem = MemoryEventStore(log_id=pgs.log_id, clock=lambda: 1_700_000_000_000_000)
    for s in (pgs, mem):
        await s.async_append(
            "a", [NewEvent("x", {"k": [1, "é", "\u2028"]}, causation_id="c")], command_id="id"
        )
        await s.async_append("b", [ev(n=2), ev(n=3)])
    assert await pgs.async_head() == await mem.async_head()
    assert await pgs.async_read() == await mem.async_read()
    for s in (pgs, mem):
        await s.async_close()


async def test_many_concurrent_appenders_are_grouped_and_all_committed(pg_server: PgServer) -> None:
    store = await open_pg(pg_server, new_schema())

    async def appender(i: int) -> None:
        for k in range(20):
            await store.async_append(f"s-{i}", [ev(k=k)], expected_version=k)

    await asyncio.gather(*(appender(i) for i in range(32)))
    assert (await store.async_head())[0] == 640
    assert await store.async_stored_head() == await store.async_head()
    await store.async_close()


# ---- fencing ----------------------------------------------------------------------------------------


async def test_once_an_epoch_is_claimed_only_its_holder_appends(pg_server: PgServer) -> None:
    schema = new_schema()
    a = await open_pg(pg_server, schema)
    b = await open_pg(pg_server, schema)
    await a.async_append("s", [ev()])  # no epoch yet: unfenced
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        e1 = await async_claim_epoch(conn, a.log_id, "node-a", schema)
        assert e1 == 1
        with pytest.raises(FencedError, match="holds epoch none"):
            await a.async_append("s", [ev()])
        a.adopt_epoch(e1)
        await a.async_append("s", [ev()], expected_version=1)
        e2 = await async_claim_epoch(conn, a.log_id, "node-b", schema)
        assert e2 == 2 and await b.async_current_epoch() is not None
        with pytest.raises(FencedError, match="log is at epoch 2, this writer holds epoch 1"):
            await a.async_append("s", [ev()], command_id="late")
        b.adopt_epoch(e2)
        res = await b.async_append("s", [ev()], expected_version=2, command_id="late")  # b's caches reloaded
        assert res.last_position == 3 and not res.duplicate
        assert [e.position for e in await b.async_read()] == [1, 2, 3]
        assert (await b.async_current_epoch())[:2] == (2, "node-b")  # type: ignore[index]
        forged = await asyncpg.connect(pg_server.dsn())
        try:  # a client that just sets an old epoch by hand is refused too
            with pytest.raises(asyncpg.PostgresError, match="fenced"):
                async with forged.transaction():
                    await forged.execute("SELECT set_config('events.epoch', '1', true)")
                    await forged.execute(f"INSERT INTO {schema}.commands VALUES ('x', 's', 1, 1, 1)")
        finally:
            await forged.close()
    finally:
        await conn.close()
        await a.async_close()
        await b.async_close()


async def test_a_commit_in_flight_when_a_new_epoch_is_claimed_is_either_before_it_or_refused(
    pg_server: PgServer,
) -> None:
    """The old writer is held just before its COMMIT while the new epoch is claimed: it must not write."""
    schema = new_schema()
    old = await open_pg(pg_server, schema)
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        old.adopt_epoch(await async_claim_epoch(conn, old.log_id, "old", schema))
        await old.async_append("s", [ev()])
        entered, gate = hold_writer_before_commit(old)
        late = asyncio.create_task(old.async_append("s", [ev()], command_id="late"))
        await asyncio.wait_for(entered.wait(), 5)
        new_epoch = await async_claim_epoch(conn, old.log_id, "new", schema)
        gate.set()
        with pytest.raises(FencedError):
            await asyncio.wait_for(late, 10)
        assert new_epoch == 2
        assert [e.position for e in await old.async_read()] == [1]
        assert await old.async_find_command("late") is None
    finally:
        await conn.close()
        await old.async_close()


async def test_an_epoch_claim_waits_for_a_commit_that_already_passed_the_check(pg_server: PgServer) -> None:
    """A transaction that passed the epoch check holds the shared lock: the claim waits for its COMMIT, so the
    new holder's head includes it."""
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    admin = await asyncpg.connect(pg_server.dsn())
    writer = await asyncpg.connect(pg_server.dsn())
    try:
        await async_claim_epoch(admin, store.log_id, "a", schema)
        tx = writer.transaction()
        await tx.start()
        await writer.execute("SELECT set_config('events.epoch', '1', true)")
        await writer.execute(f"INSERT INTO {schema}.commands VALUES ('held', 's', 1, 1, 1)")
        claim = asyncio.create_task(async_claim_epoch(admin, store.log_id, "b", schema))
        await asyncio.sleep(0.2)
        assert not claim.done()  # blocked behind the passed check
        await tx.commit()
        assert await asyncio.wait_for(claim, 10) == 2
        n = await admin.fetchval(f"SELECT count(*) FROM {schema}.commands WHERE command_id = 'held'")
        assert n == 1
    finally:
        await admin.close()
        await writer.close()
        await store.async_close()


@pytest.mark.parametrize("protocol_copy", [True, False], ids=["one_message", "public_api"])
async def test_a_group_refused_inside_its_message_writes_nothing_and_the_connection_goes_on(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, protocol_copy: bool
) -> None:
    """A group is one query message (BEGIN; SET LOCAL; COPY; NOTIFY; COMMIT) with its COPY data behind it. When
    the COPY is refused (here another writer took its position), PostgreSQL skips the rest of the message and
    drops the COPY data: nothing of the group is stored, and the next group goes over the same connection."""
    if not protocol_copy:
        monkeypatch.setattr(pg_module, "_protocol_copy_in", lambda conn: None)
    schema = new_schema()
    a = await open_pg(pg_server, schema)
    b = await open_pg(pg_server, schema)  # both believe the log is empty
    listener = await asyncpg.connect(pg_server.dsn())
    heard: list[str] = []
    got_two = asyncio.Event()

    def on_notify(*args: Any) -> None:
        heard.append(args[3])
        if args[3] == "2":
            got_two.set()

    try:
        await listener.add_listener(a.channel, on_notify)
        await a.async_append("s", [ev(n=1)])
        conn = await b._async_write_conn()
        pid = conn.get_server_pid()
        # this asyncpg has the protocol-level COPY (else every group would silently take three round trips)
        assert (pg_module._protocol_copy_in(conn) is not None) is protocol_copy
        for command_id in (None, "refused"):  # one message, and the two-message group with command ids
            with pytest.raises(asyncpg.UniqueViolationError):
                await b.async_append("t", [ev(n=0)], command_id=command_id)
            b._writer.head_position = 0  # forget the reload: collide with position 1 once more
            b._writer.stale = False
            b._stored_head = (0, genesis_hash(b.log_id))  # ... past the store's own head check too
        # refused in the second message (the commands table already holds this id): the events copied by the
        # first message are not committed either
        pg_server.psql(f"INSERT INTO {schema}.commands VALUES ('forged', 't', 99, 99, 9)")
        b._mark_stale()
        with pytest.raises(asyncpg.UniqueViolationError):
            await b.async_append("t", [ev(n=0)], command_id="forged")
        res = await b.async_append("t", [ev(n=2)], command_id="after")
        assert res.last_position == 2
        assert b._wconn is conn and conn.get_server_pid() == pid and not conn.is_in_transaction()
        assert [(e.position, e.payload) for e in await a.async_read()] == [(1, {"n": 1}), (2, {"n": 2})]
        assert await a.async_find_command("refused") is None
        await asyncio.wait_for(got_two.wait(), 10)
        assert heard == ["1", "2"]
        assert await a.async_verify_range(0, genesis_hash(a.log_id)) == (2, res.events[-1].hash)
    finally:
        await listener.close()
        await a.async_close()
        await b.async_close()


async def test_a_large_group_is_copied_in_chunks_and_a_refusal_in_its_middle_writes_nothing(
    pg_server: PgServer,
) -> None:
    """A group's COPY data larger than asyncpg's buffer goes out in several messages behind the one query; a row
    refused in the middle (a trigger raises at its payload) fails the whole group, the chunks after it are
    dropped by the server, and the same connection then writes the next large group."""
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    pg_server.psql(
        f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'refused row'; END $$; "
        f"CREATE TRIGGER refuse BEFORE INSERT ON {schema}.events FOR EACH ROW "
        "WHEN (position('\"refuse\"' in convert_from(NEW.payload, 'UTF8')) > 0) "
        f"EXECUTE FUNCTION {schema}.refuse()"
    )
    filler = "x" * 300
    try:
        conn = await store._async_write_conn()
        pid = conn.get_server_pid()
        events = [ev(i=i, filler=filler) for i in range(4000)]  # ~2 MB of COPY data
        bad = [*events[:2500], ev(refuse=1), *events[2500:]]
        with pytest.raises(asyncpg.RaiseError, match="refused row"):
            await store.async_append("big", bad, command_id="bad")
        assert await store.async_stored_head() == (0, genesis_hash(store.log_id))
        res = await store.async_append("big", events, command_id="good")
        assert res.last_position == 4000 and store._wconn is conn and conn.get_server_pid() == pid
        assert await store.async_find_command("bad") is None
        assert await store.async_verify_range(0, genesis_hash(store.log_id)) == (4000, res.events[-1].hash)
    finally:
        await store.async_close()


async def test_groups_handed_over_while_one_commits_are_written_in_order(pg_server: PgServer) -> None:
    """The writer plans group N+1 while N commits (pipeline depth 2): both are written, in order, on one chain,
    and a subscriber sees every event once."""
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    pg_server.psql(
        f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_sleep(0.5); RETURN NEW; END $$; "
        f"CREATE TRIGGER slow BEFORE INSERT ON {schema}.events FOR EACH ROW "
        "WHEN (position('\"slow\"' in convert_from(NEW.payload, 'UTF8')) > 0) "
        f"EXECUTE FUNCTION {schema}.slow()"
    )
    seen: list[int] = []
    try:
        sub = store.async_subscribe(1)

        async def follow() -> None:
            async for event in sub:
                seen.append(event.position)
                if event.position == 11:
                    return

        follower = asyncio.create_task(follow())
        first = asyncio.create_task(store.async_append("a", [ev(slow=1)], command_id="first"))
        await wait_until(lambda: len(store._writer._inflight) == 1)
        rest = [
            asyncio.create_task(store.async_append(f"s{i % 3}", [ev(i=i)], command_id=f"c{i}")) for i in range(10)
        ]
        await wait_until(lambda: len(store._writer._inflight) == 2)  # planned and handed over behind `first`
        results = [await first, *[await t for t in rest]]
        assert sorted(r.last_position for r in results) == list(range(1, 12))
        assert [e.position for e in await store.async_read()] == list(range(1, 12))
        assert await store.async_verify_range(0, genesis_hash(store.log_id)) == await store.async_stored_head()
        await asyncio.wait_for(follower, 10)
        assert seen == list(range(1, 12))
    finally:
        await store.async_close()


async def test_a_group_planned_on_a_failed_one_is_refused_even_if_the_head_position_matches(
    pg_server: PgServer,
) -> None:
    """The writer hands group N+1 over while N commits. N fails because another process took its position; that
    process's row sits exactly where N's would have been, so N+1's first position follows the stored head. It
    must still be refused (it links onto N's hash, not the stored one): written, it would break the chain."""
    schema = new_schema()
    a = await open_pg(pg_server, schema)
    await a.async_append("s", [ev(n=1)])
    b = await open_pg(pg_server, schema)
    pg_server.psql(  # a row whose payload says "slow" waits in the database before it is inserted
        f"CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_sleep(1); RETURN NEW; END $$; "
        f"CREATE TRIGGER slow BEFORE INSERT ON {schema}.events FOR EACH ROW "
        "WHEN (position('\"slow\"' in convert_from(NEW.payload, 'UTF8')) > 0) "
        f"EXECUTE FUNCTION {schema}.slow()"
    )
    try:
        n = asyncio.create_task(a.async_append("s", [ev(slow=1)]))
        await wait_until(lambda: len(a._writer._inflight) == 1)
        n1 = asyncio.create_task(a.async_append("s", [ev(n=3)], command_id="planned-on-n"))
        await wait_until(lambda: len(a._writer._inflight) == 2)  # planned on top of N, handed over
        other = await b.async_append("t", [ev(other=2)])  # takes position 2 while N waits
        assert other.last_position == 2
        with pytest.raises(asyncpg.UniqueViolationError):
            await n
        with pytest.raises(Exception):  # noqa: B017 - refused: N's error, or head_moved
            await n1
        assert [(e.position, e.stream_id) for e in await b.async_read()] == [(1, "s"), (2, "t")]
        assert await b.async_find_command("planned-on-n") is None
        again = await a.async_append("s", [ev(n=3)], command_id="planned-on-n")  # a reloads the head
        assert again.last_position == 3 and not again.duplicate
        head = await b.async_stored_head()
        assert await b.async_verify_range(0, genesis_hash(b.log_id)) == head
    finally:
        await a.async_close()
        await b.async_close()


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_a_new_log_has_no_recorded_at_index(pg_server: PgServer) -> None:
    """Reads by time binary-search the position order (the contract's read_since test runs on this store too)."""
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    try:
        assert pg_server.psql(f"SELECT count(*) FROM pg_indexes WHERE schemaname = '{schema}' "
                              "AND indexdef LIKE '%recorded_at%'") == "0"  # fmt: skip
    finally:
        await store.async_close()


# ---- connections lost ----------------------------------------------------------------------------------


async def test_a_terminated_write_connection_is_replaced(pg_server: PgServer) -> None:
    store = await open_pg(pg_server, new_schema())
    admin = await asyncpg.connect(pg_server.dsn())
    try:
        await store.async_append("s", [ev()])
        assert store._wconn is not None
        await admin.fetchval("SELECT pg_terminate_backend($1)", store._wconn.get_server_pid())
        res = await store.async_append("s", [ev()], command_id="after")
        assert res.last_position == 2
        assert [e.position for e in await store.async_read()] == [1, 2]
    finally:
        await admin.close()
        await store.async_close()


async def test_a_connection_killed_inside_the_transaction_fails_the_group_and_writes_nothing(
    pg_server: PgServer,
) -> None:
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    # the backend kills itself while inserting a row whose payload says "die" (inside the transaction)
    pg_server.psql(
        f"CREATE FUNCTION {schema}.die() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$; "
        f"CREATE TRIGGER die AFTER INSERT ON {schema}.events FOR EACH ROW "
        "WHEN (position('\"die\"' in convert_from(NEW.payload, 'UTF8')) > 0) "
        f"EXECUTE FUNCTION {schema}.die()"
    )
    try:
        await store.async_append("s", [ev()])
        with pytest.raises(Exception) as info:
            await store.async_append("s", [ev(die=1)], command_id="lost")
        assert not isinstance(info.value, FencedError)
        assert await store.async_find_command("lost") is None
        res = await store.async_append("s", [ev(ok=1)], command_id="lost")  # the retry is written once
        assert res.last_position == 2 and not res.duplicate
        assert [e.position for e in await store.async_read()] == [1, 2]
    finally:
        await store.async_close()


# ---- subscriptions across processes ---------------------------------------------------------------------


async def test_a_second_process_subscription_sees_every_event_once_in_order(pg_server: PgServer) -> None:
    schema = new_schema()
    writer = await open_pg(pg_server, schema)
    reader = await open_pg(pg_server, schema, poll_interval=30.0, application_name="reader")  # NOTIFY wakes
    admin = await asyncpg.connect(pg_server.dsn())
    seen: list[StoredEvent] = []
    total = 600
    done = asyncio.Event()

    async def consume() -> None:
        async for e in reader.async_subscribe(1, batch_size=50):
            seen.append(e)
            if e.position == total:
                done.set()
                return

    try:
        await writer.async_append("s", [ev(i=-1)])
        task = asyncio.create_task(consume())

        async def appender(i: int) -> None:
            for k in range(total // 20):
                await writer.async_append(f"s-{i}", [ev(k=k)])
                if k == 10 and i == 0:  # cut the reader's LISTEN connection mid-stream
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'reader-listen'"
                    )
                if k == 20 and i == 0:  # and later every connection of the reader (its pool too)
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name IN ('reader', 'reader-listen')"
                    )

        await asyncio.gather(*(appender(i) for i in range(20)))
        await writer.async_append("s", [ev(i=-2)])  # total + 1: the consumer stops at `total`
        await asyncio.wait_for(task, 60)
        positions = [e.position for e in seen]
        assert positions == list(range(1, total + 1))
        assert [e.hash for e in seen] == [e.hash for e in await writer.async_read(1, total)]
    finally:
        await admin.close()
        await writer.async_close()
        await reader.async_close()


# ---- copy and verify between SQLite and PostgreSQL ------------------------------------------------------


async def _fill(store: EventStore) -> None:
    await store.async_append(
        "a", [NewEvent("x", {"k": [1, "é", "\u2028"]}, causation_id="c")], command_id="id"
    )
    for i in range(30):
        await store.async_append(f"s-{i % 4}", [ev(i=i), ev(j=i)], command_id=f"cmd-{i}")


async def test_a_log_copied_sqlite_to_postgres_and_back_verifies_with_the_same_head(
    pg_server: PgServer, tmp_path: Path
) -> None:
    from events.copy import async_copy, verify_target

    src = tmp_path / "log.db"
    sq = await SQLiteEventStore.async_open(src)
    await _fill(sq)
    head = await sq.async_head()
    log_id = sq.log_id
    await sq.async_close()
    schema = new_schema()
    dsn = pg_server.dsn()
    assert await async_copy(src, dsn, dst_schema=schema) == (log_id, head[0], head[1])
    pgs = await open_pg(pg_server, schema)
    assert pgs.log_id == log_id and await pgs.async_head() == head
    dup = await pgs.async_append("s-0", [ev()], command_id="cmd-3")  # command ids came along
    assert dup.duplicate and dup.last_position == 9
    await pgs.async_append("after", [ev()])  # and the chain goes on
    new_head = await pgs.async_head()
    await pgs.async_close()
    report = await asyncio.to_thread(verify_target, dsn, schema=schema)
    assert report.exit_code == 0 and report.head_hash == new_head[1].hex() and report.path == dsn
    back = tmp_path / "back.db"
    assert await async_copy(dsn, back, src_schema=schema) == (log_id, new_head[0], new_head[1])
    assert verify(back).exit_code == 0
    with pytest.raises(Exception, match="already holds events"):
        await async_copy(src, dsn, dst_schema=schema)
    with pytest.raises(Exception, match="exists"):
        await async_copy(dsn, back, src_schema=schema)


async def test_a_tampered_log_is_not_copied_and_verify_of_a_dsn_reports_it(
    pg_server: PgServer, tmp_path: Path
) -> None:
    from events.copy import async_copy, verify_target

    schema = new_schema()
    pgs = await open_pg(pg_server, schema)
    await _fill(pgs)
    await pgs.async_close()
    pg_server.psql(f"ALTER TABLE {schema}.events DISABLE TRIGGER USER")  # what the owner could do
    pg_server.psql(
        f"UPDATE {schema}.events SET payload = convert_to('{{\"i\":99}}', 'UTF8') WHERE position = 7"
    )
    report = await asyncio.to_thread(verify_target, pg_server.dsn(), schema=schema)
    assert report.exit_code == 1 and report.first_bad_position == 7
    with pytest.raises(Exception, match="does not verify at position 7"):
        await async_copy(pg_server.dsn(), tmp_path / "x.db", src_schema=schema)
    bad = await asyncio.to_thread(verify_target, pg_server.dsn(), schema="no_such_schema")
    assert bad.exit_code == 2


def test_python_m_events_copy_and_verify_on_a_dsn(pg_server: PgServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    async def make() -> None:
        sq = await SQLiteEventStore.async_open(tmp_path / "log.db")
        await _fill(sq)
        await sq.async_close()

    asyncio.run(make())
    schema = new_schema()
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "events",
            "copy",
            str(tmp_path / "log.db"),
            pg_server.dsn(),
            "--dst-schema",
            schema,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "61 events" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "events", "verify", pg_server.dsn(), "--schema", schema],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0 and "INTACT" in r.stdout, r.stdout + r.stderr
    # sign the PostgreSQL log's head, then verify it against that checkpoint
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "events", *args], capture_output=True, text=True, env=env, timeout=60
        )

    assert run("keygen", str(tmp_path / "keys")).returncode == 0
    out = tmp_path / "checkpoints.jsonl"
    r = run("checkpoint", pg_server.dsn(), "--schema", schema, "--key", str(tmp_path / "keys" / "checkpoint-ed25519.key"),
            "--out", str(out))  # fmt: skip
    assert r.returncode == 0 and "position 61" in r.stdout, r.stdout + r.stderr
    r = run("verify", pg_server.dsn(), "--schema", schema, "--checkpoints", str(out), "--public-key",
            str(tmp_path / "keys" / "checkpoint-ed25519.pub"))  # fmt: skip
    assert r.returncode == 0 and "INTACT" in r.stdout, r.stdout + r.stderr


async def test_verify_range_recomputes_pages_and_names_the_first_forged_row(pg_server: PgServer) -> None:
    schema = new_schema()
    store = await open_pg(pg_server, schema)
    try:
        for i in range(30):
            await store.async_append(f"s{i % 4}", [ev(i=i), ev(i=i + 100)])
        head = await store.async_stored_head()
        genesis = await store.async_hash_at(0)
        assert genesis is not None
        assert await store.async_verify_range(0, genesis, page=7) == head  # pages of 7 rows: no seam is skipped
        at_20 = await store.async_hash_at(20)
        assert at_20 is not None
        assert await store.async_verify_range(20, at_20, head[0], page=7) == head
        with pytest.raises(LogIntegrityError) as err:
            await store.async_verify_range(20, at_20, head[0] + 5)
        assert (err.value.kind, err.value.position) == ("truncated", head[0] + 1)
        # a superuser bypasses the triggers: a payload, then a link, changed in place
        conn = await asyncpg.connect(pg_server.dsn())
        try:
            await conn.execute("SET session_replication_role = replica")
            await conn.execute(f"UPDATE {schema}.events SET payload = $1 WHERE position = 33", b'{"forged":1}')
            with pytest.raises(LogIntegrityError) as err:
                await store.async_verify_range(0, genesis, page=7)
            assert (err.value.kind, err.value.position) == ("hash_mismatch", 33)
            assert await store.async_verify_range(0, genesis, 32) == (32, await store.async_hash_at(32))
            await conn.execute(f"DELETE FROM {schema}.events WHERE position = 12")
            with pytest.raises(LogIntegrityError) as err:
                await store.async_verify_range(0, genesis, page=7)
            assert (err.value.kind, err.value.position) == ("position_gap", 12)
            await conn.execute(f"UPDATE {schema}.events SET prev_hash = $1 WHERE position = 5", b"\x00" * 32)
            with pytest.raises(LogIntegrityError) as err:
                await store.async_verify_range(0, genesis)
            assert (err.value.kind, err.value.position) == ("broken_link", 5)
        finally:
            await conn.close()
    finally:
        await store.async_close()
