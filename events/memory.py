"""MemoryEventStore: the same API and the same hash chain, kept in memory (tests, tools)."""

from __future__ import annotations

import bisect
import uuid
from typing import Any

from .canonical import canonical_json, loads
from .chain import genesis_hash
from .envelope import AppendResult, Snapshot, us_to_datetime
from .store import DEFAULT_MAX_PAYLOAD_BYTES, EventStore, system_clock_us
from .upcast import Upcasters
from .writer import CommandRow, Row


class MemoryEventStore(EventStore):
    """An in-memory event log; rows are immutable tuples in a list indexed by position - 1."""

    def __init__(
        self,
        log_id: str | None = None,
        upcasters: Upcasters | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        *,
        clock: Any = None,
        subscriber_queue_limit: int = 10_000,
    ) -> None:
        log_id = log_id or str(uuid.uuid4())
        super().__init__(
            log_id=log_id,
            head_position=0,
            head_hash=genesis_hash(log_id),
            last_recorded_us=0,
            upcasters=upcasters,
            max_payload_bytes=max_payload_bytes,
            clock=clock or system_clock_us,
            subscriber_queue_limit=subscriber_queue_limit,
        )
        self._rows: list[Row] = []
        self._streams: dict[str, list[int]] = {}  # stream id -> positions
        self._commands: dict[str, CommandRow] = {}
        self._snapshots: dict[str, tuple[int, bytes, bytes, int]] = {}

    @classmethod
    async def async_open(
        cls,
        path: object = None,
        upcasters: Upcasters | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        **kw: Any,
    ) -> MemoryEventStore:
        """Same signature as SQLiteEventStore.async_open; `path` is ignored."""
        return cls(None, upcasters, max_payload_bytes, **kw)

    async def _async_commit(self, rows: list[Row], commands: list[CommandRow]) -> None:
        # check everything first so that a failure writes nothing (like a rolled back transaction)
        if rows[0][0] != len(self._rows) + 1:
            raise RuntimeError("position gap in commit")
        for cmd in commands:
            if cmd[0] in self._commands:
                raise RuntimeError(f"duplicate command id {cmd[0]!r}")
        for row in rows:
            self._rows.append(tuple(row))
            self._streams.setdefault(row[1], []).append(row[0])
        for cmd in commands:
            self._commands[cmd[0]] = cmd

    async def _async_lookup(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]:
        versions = {sid: len(self._streams.get(sid, ())) for sid in stream_ids}
        found: dict[str, AppendResult] = {}
        for cid in command_ids:
            cmd = self._commands.get(cid)
            if cmd is not None:
                rows = self._rows[cmd[2] - 1 : cmd[3]]
                found[cid] = AppendResult(tuple(self._rows_to_events(rows)), cmd[3], cmd[4], False)
        return versions, found

    async def _async_read_rows(
        self, kind: str, key: Any, start: int, end: int | None, limit: int | None
    ) -> list[Row]:
        if kind == "stream":
            positions = self._streams.get(key, [])
            lo = max(start, 1) - 1
            hi = len(positions) if end is None else max(lo, min(end, len(positions)))
            rows = [self._rows[p - 1] for p in positions[lo:hi]]
        elif kind == "position":
            lo = max(start, 1) - 1
            hi = len(self._rows) if end is None else max(lo, min(end, len(self._rows)))
            rows = self._rows[lo:hi]
        else:
            lo = bisect.bisect_left(self._rows, start, key=lambda r: r[5])
            rows = self._rows[lo:]
        return list(rows if limit is None else rows[:limit])

    async def async_hash_at(self, position: int) -> bytes | None:
        if position == 0:
            return genesis_hash(self.log_id)
        if 1 <= position <= len(self._rows):
            return bytes(self._rows[position - 1][12])
        return None

    async def async_save_snapshot(self, name: str, position: int, state: dict[str, Any]) -> Snapshot:
        head_hash = await self.async_hash_at(position)
        if head_hash is None:
            raise ValueError(f"cannot snapshot at position {position}: the log ends before it")
        now = system_clock_us()
        data = canonical_json(state)
        self._snapshots[name] = (position, head_hash, data, now)
        return Snapshot(name, position, head_hash, loads(data), us_to_datetime(now))

    async def async_load_snapshot(self, name: str) -> Snapshot | None:
        snap = self._snapshots.get(name)
        if snap is None:
            return None
        return Snapshot(name, snap[0], snap[1], loads(snap[2]), us_to_datetime(snap[3]))
