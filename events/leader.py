"""Leader election over a PostgreSQL log, with a fencing epoch.

Every candidate holds a dedicated connection and waits in `pg_advisory_lock` on a key of the log. The one that
gets the lock claims the next epoch (events.postgres.async_claim_epoch) and its store presents that epoch with
every append: PostgreSQL refuses appends of any older epoch in the appending transaction itself.

Timing budget (Timings, checked at construction):

* lease_s — PostgreSQL ends the leader's lock session once it has been silent this long
  (`idle_session_timeout`, plus TCP keepalive/user timeouts on TCP): a paused or partitioned leader loses
  the lock after at most lease_s, and a standby takes over at once. A leader that dies (kill -9) loses it
  as soon as PostgreSQL sees its connection close.
* heartbeat_s — the leader pings its lock session this often (so a live leader is never idle for lease_s).
* fence_after_s — a leader that has not had an answer from PostgreSQL for this long stops acting at once
  (`is_leading()` turns false, the on_deposed callback runs, the session is closed), before any other may
  take over: fence_after_s < lease_s, measured from the moment the last successful ping was SENT, while
  PostgreSQL's lease runs from the moment it was answered.

So: heartbeat_s < fence_after_s < lease_s, and a takeover after a leader's silence takes lease_s plus one
round trip; after its death, one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .aio import async_wait_event
from .postgres import PostgresEventStore, async_claim_epoch, lock_key, quote_ident

STANDBY = "standby"
LEADER = "leader"


@dataclass(frozen=True)
class Timings:
    lease_s: float = 4.0
    heartbeat_s: float = 0.5
    fence_after_s: float = 2.5
    retry_s: float = 0.5  # pause before campaigning again after losing the database

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.fence_after_s < self.lease_s:
            raise ValueError(
                "leader timings must satisfy 0 < heartbeat_s < fence_after_s < lease_s "
                f"(got heartbeat_s={self.heartbeat_s}, fence_after_s={self.fence_after_s}, lease_s={self.lease_s})"
            )
        if self.retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, got {self.retry_s}")


Elected = Callable[[int, str], Awaitable[None]]
"""on_elected(epoch, cause): the new leader takes over (it may append: its store presents the epoch)."""
Deposed = Callable[[str], None]
"""on_deposed(cause): called synchronously the moment leadership is lost: stop acting now."""


class Leadership:
    """Campaigns for the lead of `store`'s log as `node`, leads, and falls back to standby when deposed."""

    def __init__(
        self,
        store: PostgresEventStore,
        node: str,
        timings: Timings | None = None,
        *,
        on_elected: Elected | None = None,
        on_deposed: Deposed | None = None,
    ) -> None:
        if not node or not isinstance(node, str):
            raise ValueError("node must be a non-empty string")
        self.store = store
        self.node = node
        self.timings = timings or Timings()
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.role = STANDBY
        self.epoch: int | None = None
        self.elected_at: float | None = None  # time.time() of the last election won
        self.last_cause = "start"
        self._last_ok = 0.0  # monotonic time the last successful ping was sent
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._elected_task: asyncio.Task[None] | None = None
        self._key = lock_key("leader", store.log_id)
        self.changed = asyncio.Event()  # set (and replaced) at every change of role

    # ---- the guard ------------------------------------------------------------------------------------
    def is_leading(self) -> bool:
        """True only while this process leads and heard from PostgreSQL less than fence_after_s ago (checked
        at every call: a process that was paused past it is not leading, even before it noticed)."""
        return self.role == LEADER and time.monotonic() - self._last_ok < self.timings.fence_after_s

    # ---- life cycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._async_run(), name=f"leadership-{self.node}"
            )

    async def async_stop(self) -> None:
        """Stop campaigning; a leader steps down (its session closes, so a standby takes over at once)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.role == LEADER:
            self._depose("stopped")
        await self._async_close_conn()

    async def async_wait_role(self, role: str, timeout: float | None = None) -> None:
        async def wait() -> None:
            while self.role != role:
                ev = self.changed
                await ev.wait()

        await asyncio.wait_for(wait(), timeout)

    async def _async_close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _async_run(self) -> None:
        while True:
            try:
                epoch, cause = await self._async_campaign()
                await self._async_lead(epoch, cause)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away, or on_elected failed: standby, campaign again
                if self.role == LEADER:
                    self._depose(f"{type(exc).__name__}: {exc}")
            finally:
                await self._async_close_conn()
            await asyncio.sleep(self.timings.retry_s)

    async def _async_campaign(self) -> tuple[int, str]:
        t = self.timings
        lease_ms = str(int(t.lease_s * 1000))
        conn = await asyncpg.connect(
            self.store.dsn,
            server_settings={
                "application_name": f"events-leader:{self.node}",
                "idle_session_timeout": lease_ms,  # PostgreSQL >= 14: the lease
                "tcp_user_timeout": lease_ms,
                "tcp_keepalives_idle": str(max(1, int(t.heartbeat_s))),
                "tcp_keepalives_interval": "1",
                "tcp_keepalives_count": str(max(1, int(t.lease_s - t.heartbeat_s))),
            },
        )
        self._conn = conn
        self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.execute("SELECT pg_advisory_lock($1)", self._key)  # waits while another leads
        sent = time.monotonic()
        s = quote_ident(self.store.schema)
        prev = await conn.fetchrow(f"SELECT epoch, holder FROM {s}.epochs ORDER BY epoch DESC LIMIT 1")
        epoch = await async_claim_epoch(conn, self.store.log_id, self.node, self.store.schema)
        self._last_ok = sent
        if prev is None:
            cause = "first leader of the log"
        elif prev[1] == self.node:
            cause = f"re-elected after losing epoch {prev[0]}"
        else:
            cause = f"took over from {prev[1]} (epoch {prev[0]})"
        return epoch, cause

    async def _async_lead(self, epoch: int, cause: str) -> None:
        t = self.timings
        self.epoch = epoch
        self.role = LEADER
        self.elected_at = time.time()
        self.store.adopt_epoch(epoch)
        self._signal()
        if self.on_elected is not None:  # runs beside the heartbeat (a take-over may outlast the lease)
            self._elected_task = asyncio.get_running_loop().create_task(
                self._async_elected(epoch, cause), name=f"leader-elected-{self.node}"
            )
        conn = self._conn
        if conn is None:
            raise RuntimeError("internal error: leading without a connection")
        s = quote_ident(self.store.schema)
        while self.role == LEADER:
            await async_wait_event(self._lost, t.heartbeat_s)
            if self._lost.is_set():
                self._depose("lost its database session")
                return
            if not self.is_leading():
                self._depose("no answer from PostgreSQL within fence_after_s")
                return
            sent = time.monotonic()
            budget = t.fence_after_s - (sent - self._last_ok)
            try:
                current = await asyncio.wait_for(conn.fetchval(f"SELECT max(epoch) FROM {s}.epochs"), budget)
            except Exception as exc:
                self._depose(f"heartbeat failed: {type(exc).__name__}")
                return
            if current != epoch:
                self._depose(f"superseded by epoch {current}")
                return
            self._last_ok = sent

    async def _async_elected(self, epoch: int, cause: str) -> None:
        if self.on_elected is None:
            raise RuntimeError("internal error: elected without an on_elected callback")
        try:
            await self.on_elected(epoch, cause)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a leader that cannot take over steps down (another may)
            if self.epoch == epoch:
                self._depose(f"take-over failed: {type(exc).__name__}: {exc}")

    def _depose(self, cause: str) -> None:
        if self.role != LEADER:
            return
        task, self._elected_task = self._elected_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.role = STANDBY
        self.last_cause = cause
        self.store.adopt_epoch(None)
        if self._conn is not None:
            self._conn.terminate()  # release the lock now if we still hold it
            self._conn = None
        self._signal()
        if self.on_deposed is not None:
            self.on_deposed(cause)

    def _signal(self) -> None:
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()

    # ---- who leads ----------------------------------------------------------------------------------------
    async def async_status(self) -> dict[str, Any]:
        """The log's current epoch and holder, and the candidates connected to PostgreSQL (waiting or leading)."""
        current = await self.store.async_current_epoch()
        nodes: list[dict[str, Any]] = []
        with contextlib.suppress(Exception):
            rows = await self.store._pool.fetch(
                "SELECT a.application_name, a.pid, a.backend_start, a.client_addr::text, "
                "coalesce(bool_or(l.granted), false) AS leads "
                "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' "
                "WHERE a.application_name LIKE 'events-leader:%' GROUP BY 1, 2, 3, 4 ORDER BY 1"
            )
            for r in rows:
                nodes.append(
                    {
                        "node": str(r[0]).split(":", 1)[1],
                        "role": LEADER if r[4] else STANDBY,
                        "pid": r[1],
                        "since": r[2].isoformat() if r[2] else None,
                        "client": r[3],
                    }
                )
        return {
            "epoch": current[0] if current else None,
            "leader": current[1] if current else None,
            "elected_at_us": current[2] if current else None,
            "nodes": nodes,
        }
