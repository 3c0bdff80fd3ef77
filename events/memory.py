"""MemoryEventStore: the same API and the same hash chain, kept in memory (tests, tools)."""

from __future__ import annotations

import bisect
import uuid
from typing import Any

from .chain import genesis_hash
from .envelope import AppendResult
from .store import DEFAULT_MAX_PAYLOAD_BYTES, Clock, EventStore, SnapshotRow
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
        clock: Clock | None = None,
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
            clock=clock,
            subscriber_queue_limit=subscriber_queue_limit,
        )
        self._rows: list[Row] = []
        self._streams: dict[str, list[int]] = {}  # stream id -> positions
        self._commands: dict[str, CommandRow] = {}
        self._snapshots: dict[str, SnapshotRow] = {}

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
            self._rows.append(row)
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

    async def _async_hash_at(self, position: int) -> bytes | None:
        return bytes(self._rows[position - 1][12]) if position <= len(self._rows) else None

    async def _async_put_snapshot(self, name: str, snapshot: SnapshotRow) -> None:
        self._snapshots[name] = snapshot

    async def _async_get_snapshot(self, name: str) -> SnapshotRow | None:
        return self._snapshots.get(name)
