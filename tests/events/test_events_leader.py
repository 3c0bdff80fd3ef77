"""Leader election with fencing epochs, against a real PostgreSQL (in-process candidates and child processes
that are killed, paused and cut off)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events import FencedError, NewEvent
from events.leader import LEADER, STANDBY, Leadership, Timings
from events.postgres import PostgresEventStore
from moldlab.testing.pgserver import PgServer
from tests.events.test_events_store_postgres import new_schema

FAST = Timings(lease_s=2.0, heartbeat_s=0.3, fence_after_s=1.2, retry_s=0.2)
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "kw",
    [
        {"lease_s": 3, "heartbeat_s": 1, "fence_after_s": 3},
        {"lease_s": 3, "heartbeat_s": 2, "fence_after_s": 1},
        {"lease_s": 3, "heartbeat_s": 0, "fence_after_s": 1},
        {"lease_s": 3, "heartbeat_s": 1, "fence_after_s": 2, "retry_s": 0},
    ],
)
def test_timings_that_break_the_budget_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        Timings(**kw)


async def _candidate(pg: PgServer, schema: str, node: str, log: list[tuple[str, Any]]) -> Leadership:
    store = await PostgresEventStore.async_open(pg.dsn(), schema=schema)

    async def elected(epoch: int, cause: str) -> None:
        log.append((node, ("elected", epoch, cause)))

    lead = Leadership(
        store, node, FAST, on_elected=elected, on_deposed=lambda c: log.append((node, ("deposed", c)))
    )
    lead.start()
    return lead


async def waiting_in_lock(pg: PgServer, node: str, timeout: float = 20) -> None:
    """Until `node`'s lock session waits in pg_advisory_lock (it campaigns, another leads)."""
    conn = await asyncpg.connect(pg.dsn())
    try:
        async with asyncio.timeout(timeout):
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                "WHERE a.application_name = $1 AND l.locktype = 'advisory' AND NOT l.granted",
                f"events-leader:{node}",
            ):
                await asyncio.sleep(0.02)  # a poll of the condition
    finally:
        await conn.close()


async def _close(*leads: Leadership) -> None:
    for lead in leads:
        await lead.async_stop()
        await lead.store.async_close()


async def test_one_leads_the_other_waits_and_takes_over_when_it_steps_down(pg_server: PgServer) -> None:
    schema = new_schema()
    log: list[tuple[str, Any]] = []
    a = await _candidate(pg_server, schema, "a", log)
    await a.async_wait_role(LEADER, 10)
    b = await _candidate(pg_server, schema, "b", log)
    try:
        await waiting_in_lock(pg_server, "b")
        assert (a.role, b.role) == (LEADER, STANDBY) and a.is_leading() and not b.is_leading()
        assert a.epoch == 1 and log == [("a", ("elected", 1, "first leader of the log"))]
        await a.store.async_append("s", [NewEvent("x")])
        with pytest.raises(FencedError):
            await b.store.async_append("s", [NewEvent("x")])
        status = await b.async_status()
        assert status["epoch"] == 1 and status["leader"] == "a"
        assert sorted((n["node"], n["role"]) for n in status["nodes"]) == [("a", LEADER), ("b", STANDBY)]
        await a.async_stop()
        await b.async_wait_role(LEADER, 10)
        assert b.epoch == 2 and log[-1] == ("b", ("elected", 2, "took over from a (epoch 1)"))
        res = await b.store.async_append("s", [NewEvent("y")], expected_version=1)
        assert res.last_position == 2
        with pytest.raises(FencedError):
            await a.store.async_append("s", [NewEvent("late")])
    finally:
        await _close(a, b)


async def test_a_leader_whose_session_is_terminated_is_deposed_and_a_standby_takes_over(
    pg_server: PgServer,
) -> None:
    schema = new_schema()
    log: list[tuple[str, Any]] = []
    a = await _candidate(pg_server, schema, "a", log)
    await a.async_wait_role(LEADER, 10)
    b = await _candidate(pg_server, schema, "b", log)
    admin = await asyncpg.connect(pg_server.dsn())
    try:
        await waiting_in_lock(pg_server, "b")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'events-leader:a'"
        )
        await b.async_wait_role(LEADER, 10)
        # a notices its lost session by the connection's termination or by its next heartbeat, whichever
        # comes first (b may be elected before either): deposed either way, never leading beside b
        await a.async_wait_role(STANDBY, 10)
        causes = [e[1] for n, e in log if n == "a" and e[0] == "deposed"]
        assert causes and (
            causes[0] == "lost its database session" or causes[0].startswith(("heartbeat failed", "superseded"))
        ), log
        assert not a.is_leading()
        with pytest.raises(FencedError):
            await a.store.async_append("s", [NewEvent("late")])
        # a campaigns again and waits: it is the standby now
        await waiting_in_lock(pg_server, "a")
        assert a.role == STANDBY and b.role == LEADER
    finally:
        await admin.close()
        await _close(a, b)


class Child:
    def __init__(self, proc: asyncio.subprocess.Process, node: str) -> None:
        self.proc = proc
        self.node = node
        self.lines: list[dict[str, Any]] = []

    async def expect(self, timeout: float = 20, **want: Any) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"{self.node} exited; said {self.lines}")
                line = json.loads(raw)
                self.lines.append(line)
                if all(line.get(k) == v for k, v in want.items()):
                    return line

        return await asyncio.wait_for(read(), timeout)


@pytest.fixture
async def spawn(pg_server: PgServer) -> AsyncIterator[Any]:
    children: list[Child] = []

    async def start(schema: str, node: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.events.leader_child",
            pg_server.dsn(),
            schema,
            node,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        child = Child(proc, node)
        children.append(child)
        await child.expect(role="candidate")
        return child

    yield start
    for c in children:
        if c.proc.returncode is None:
            with_cont = c.proc.pid
            os.kill(with_cont, signal.SIGCONT)
            c.proc.kill()
            await c.proc.wait()


async def _ticks(pg: PgServer, schema: str) -> list[tuple[int, str, int]]:
    conn = await asyncpg.connect(pg.dsn())
    try:
        rows = await conn.fetch(
            f"SELECT position, convert_from(payload, 'UTF8')::json->>'node', "
            f"(convert_from(payload, 'UTF8')::json->>'epoch')::int FROM {schema}.events "
            "WHERE event_type = 'tick' ORDER BY position"
        )
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


async def test_kill_9_of_the_leader_process_a_standby_leads_and_appends(
    pg_server: PgServer, spawn: Any
) -> None:
    schema = new_schema()
    a = await spawn(schema, "a")
    await a.expect(role="leader", epoch=1)
    b = await spawn(schema, "b")
    await waiting_in_lock(pg_server, "b")
    a.proc.kill()
    await a.proc.wait()
    line = await b.expect(role="leader")
    assert line["epoch"] == 2 and line["cause"] == "took over from a (epoch 1)"
    ticks = await _ticks_until(pg_server, schema, lambda ts: any(t[1] == "b" for t in ts))
    assert {t[1] for t in ticks} == {"a", "b"}
    first_b = min(t[0] for t in ticks if t[1] == "b")
    assert all(t[0] < first_b for t in ticks if t[1] == "a")


async def _ticks_until(
    pg: PgServer, schema: str, done: Any, timeout: float = 30
) -> list[tuple[int, str, int]]:
    async with asyncio.timeout(timeout):
        while not done(ticks := await _ticks(pg, schema)):
            await asyncio.sleep(0.02)  # a poll of the condition
    return ticks


@pytest.mark.parametrize("how", ["sigstop", "terminate"])
async def test_a_paused_or_cut_off_leader_writes_nothing_once_a_standby_took_over(
    pg_server: PgServer, spawn: Any, how: str
) -> None:
    """SIGSTOP past the lease (or pg_terminate_backend of its lock session): b takes over with epoch 2; the
    old leader, resumed, appends nothing more (its guard is false at once and its epoch is refused) and
    becomes a standby; the log shows both epochs."""
    schema = new_schema()
    a = await spawn(schema, "a")
    await a.expect(role="leader", epoch=1)
    b = await spawn(schema, "b")
    await waiting_in_lock(pg_server, "b")
    if how == "sigstop":
        os.kill(a.proc.pid, signal.SIGSTOP)
    else:
        admin = await asyncpg.connect(pg_server.dsn())
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'events-leader:a'"
        )
        await admin.close()
    line = await b.expect(role="leader", timeout=30)
    assert line["epoch"] == 2
    await _ticks_until(pg_server, schema, lambda ts: any(t[1] == "b" for t in ts))  # b appends in epoch 2
    if how == "sigstop":
        os.kill(a.proc.pid, signal.SIGCONT)
    await a.expect(role="standby", timeout=30)
    # A negative observation (a stale `a` must write nothing), measured in b's progress rather than seconds:
    # the window closes once b has appended 10 more ticks (50 ms apart) after a said it is a standby.
    seen = len(await _ticks(pg_server, schema))
    ticks = await _ticks_until(pg_server, schema, lambda ts: len(ts) >= seen + 10)
    epochs_of = {(t[1], t[2]) for t in ticks}
    assert ("a", 1) in epochs_of and ("b", 2) in epochs_of
    first_b = min(t[0] for t in ticks if t[1] == "b")
    assert all(t[0] < first_b for t in ticks if t[1] == "a"), ticks
    assert all(t[2] == 1 for t in ticks if t[1] == "a")
