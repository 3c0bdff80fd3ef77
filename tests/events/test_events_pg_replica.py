"""Stretch: the log on a PostgreSQL primary with a synchronous streaming replica; the primary crashes, the
replica is promoted, the store reconnects through a multi-host DSN (target_session_attrs=read-write) and no
acknowledged event is lost; appends whose outcome was unknown are retried with their command id, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from events import AppendResult, NewEvent
from events.copy import verify_target
from events.postgres import PostgresEventStore
from moldlab.testing.pgserver import PgServer

pytestmark = pytest.mark.slow


def wait_synchronous(primary: PgServer) -> None:
    """Make the primary's one replica synchronous (every COMMIT waits for it) and wait until it is."""
    primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.psql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 60
    while primary.psql("SELECT string_agg(sync_state, ',') FROM pg_stat_replication") != "sync":
        assert time.monotonic() < deadline, "the replica never became synchronous"
        time.sleep(0.1)


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[PgServer, PgServer]]:
    primary = PgServer(fsync=False).start()
    replica = PgServer(fsync=False)
    try:
        replica.start_replica_of(primary)
        wait_synchronous(primary)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def test_primary_crash_and_promotion_lose_no_acknowledged_event(
    primary_and_replica: tuple[PgServer, PgServer],
) -> None:
    primary, replica = primary_and_replica
    dsn = f"postgresql://postgres@/postgres?host={primary.dir},{replica.dir}&target_session_attrs=read-write"
    store = await PostgresEventStore.async_open(dsn, schema="ha")
    acked: dict[str, AppendResult] = {}
    failed: set[str] = set()
    crashed = asyncio.Event()

    async def appender(i: int) -> None:
        for k in range(40):
            cid = f"c-{i}-{k}"
            while True:
                try:
                    acked[cid] = await store.async_append(
                        f"s-{i}", [NewEvent("x", {"i": i, "k": k})], command_id=cid
                    )
                    break
                except Exception:  # primary gone / not yet promoted: retry the same command id
                    failed.add(cid)
                    await asyncio.sleep(0.1)
            if len(acked) == 200 and not crashed.is_set():
                crashed.set()

    async def chaos() -> None:
        await crashed.wait()
        await asyncio.to_thread(primary.crash)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(replica.promote)

    await asyncio.wait_for(asyncio.gather(chaos(), *(appender(i) for i in range(10))), 180)
    assert len(acked) == 400
    stored = {e.position: e for e in await store.async_read()}
    for cid, res in acked.items():  # every acknowledged event is there, where and as it was acknowledged
        for ev in res.events:
            assert stored[ev.position] == ev, cid
    assert sorted(stored) == list(range(1, len(stored) + 1))
    assert len(stored) == 400  # retried commands were written once
    await store.async_close()
    report = await asyncio.to_thread(verify_target, replica.dsn(), schema="ha")
    assert report.exit_code == 0 and report.last_position == 400
    print(f"appends that failed during the failover and were retried: {len(failed)}")
