"""The single writer task with group commit.

Appenders put requests in a queue; the writer drains whatever is queued, checks each request against its
in-memory caches (stream versions, recent command ids), chains the accepted events, commits them in ONE
transaction and only then resolves each caller's future. A request that fails its checks fails alone;
a failed COMMIT fails the whole group and leaves the caches as they were (they are only updated after
COMMIT).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from .chain import INTS, TAG
from .envelope import ANY_VERSION, AppendResult, StoredEvent, us_to_datetime
from .errors import ConcurrencyError, StoreClosedError

Row = tuple[Any, ...]
"""(position, stream_id, stream_version, event_type, schema_version, recorded_at_us, actor, command_id,
causation_id, correlation_id, payload_bytes, prev_hash, hash) -- the stored columns, in order."""
CommandRow = tuple[str, str, int, int, int]
"""(command_id, stream_id, first_position, last_position, stream_version)."""


@dataclass(slots=True)
class PreparedEvent:
    """An event validated and encoded by the caller, before the writer assigns its place in the log."""

    event_type: str
    schema_version: int
    actor: str
    causation_id: str | None
    correlation_id: str | None
    fields: bytes
    payload_bytes: bytes
    payload: dict[str, Any]


@dataclass(slots=True)
class AppendRequest:
    stream_id: str
    events: Sequence[PreparedEvent]
    expected_version: int
    command_id: str | None
    future: asyncio.Future[AppendResult]


class WriterBackend(Protocol):
    async def _async_lookup(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]:
        """Current versions of the given streams (absent = 0) and stored results of the given commands."""
        ...

    async def _async_commit(self, rows: list[Row], commands: list[CommandRow]) -> None:
        """Write rows and command rows in one durable transaction, or raise and write nothing."""
        ...


class GroupWriter:
    """Owns the write-side caches (head, stream versions, recent commands) and the writer task."""

    RECENT_COMMANDS = 4096

    def __init__(
        self,
        backend: WriterBackend,
        *,
        head_position: int,
        head_hash: bytes,
        last_recorded_us: int,
        clock: Callable[[], int],
        make_event: Callable[[Row, dict[str, Any], datetime], StoredEvent],
        publish: Callable[[list[StoredEvent]], None],
        max_group_events: int = 20_000,
    ) -> None:
        self._backend = backend
        self.head_position = head_position
        self.head_hash = head_hash
        self.last_recorded_us = last_recorded_us
        self._clock = clock
        self._make_event = make_event
        self._publish = publish
        self._max_group_events = max_group_events
        self._versions: dict[str, int] = {}
        self._recent: OrderedDict[str, AppendResult] = OrderedDict()
        # requests waiting for the writer (None = stop); the writer sleeps on _wakeup when it is empty
        self._queue: deque[AppendRequest | None] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # test hook: awaited before each commit (lets tests hold a group open)
        self.before_commit: Callable[[], Awaitable[None]] | None = None

    def submit(self, request: AppendRequest) -> None:
        if self._closed:
            raise StoreClosedError("the event store is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._async_run(), name="events-writer")
        self._queue.append(request)
        self._wake()

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None:
            self._wakeup = None
            if not w.done():
                w.set_result(None)

    async def async_close(self) -> None:
        """Finish what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._queue.append(None)
            self._wake()
            await self._task

    async def _async_run(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            while not queue:
                self._wakeup = loop.create_future()
                await self._wakeup
            first = queue.popleft()
            if first is None:
                return
            group = [first]
            n = len(first.events)
            stop = False
            while n < self._max_group_events and queue:
                req = queue.popleft()
                if req is None:
                    stop = True
                    break
                group.append(req)
                n += len(req.events)
            try:
                await self._async_process(group)
            except Exception as exc:  # the writer must survive a failed group
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(exc)
            except BaseException:
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(StoreClosedError("the writer was cancelled"))
                raise
            if stop:
                return

    async def _async_process(self, group: list[AppendRequest]) -> None:
        versions = self._versions
        recent = self._recent
        need_streams = {r.stream_id for r in group if r.stream_id not in versions}
        need_commands = {
            r.command_id for r in group if r.command_id is not None and r.command_id not in recent
        }
        found: dict[str, AppendResult] = {}
        if need_streams or need_commands:
            loaded, found = await self._backend._async_lookup(need_streams, need_commands)
            for sid in need_streams:
                versions[sid] = loaded.get(sid, 0)

        staged: dict[str, int] = {}
        rows: list[Row] = []
        command_rows: list[CommandRow] = []
        accepted: list[tuple[AppendRequest, AppendResult]] = []
        in_group: dict[str, AppendResult] = {}
        in_group_dups: list[tuple[AppendRequest, str]] = []
        position = self.head_position
        prev = self.head_hash
        recorded_us = max(self._clock(), self.last_recorded_us)
        recorded_at = us_to_datetime(recorded_us)
        make_event = self._make_event
        sha256 = hashlib.sha256
        join = b"".join
        pack_ints = INTS.pack  # the chain (events.chain.link_hash), inlined: the same bytes, one call less

        for req in group:
            fut = req.future
            cid = req.command_id
            sid = req.stream_id
            if cid is not None:
                original = recent.get(cid) or found.get(cid)
                if original is not None:
                    if not fut.done():
                        fut.set_result(replace(original, duplicate=True))
                    continue
                if cid in in_group:
                    in_group_dups.append((req, cid))
                    continue
            current = staged[sid] if sid in staged else versions[sid]
            expected = req.expected_version
            if expected != ANY_VERSION and expected != current:
                if not fut.done():
                    fut.set_exception(ConcurrencyError(sid, expected, current))
                continue
            version = current
            stored: list[StoredEvent] = []
            first_position = position + 1
            for ev in req.events:
                position += 1
                version += 1
                sv = ev.schema_version
                data = ev.payload_bytes
                h = sha256(join((TAG, prev, pack_ints(position, version, recorded_us, sv), ev.fields, data))).digest()
                row = (
                    position,
                    sid,
                    version,
                    ev.event_type,
                    sv,
                    recorded_us,
                    ev.actor,
                    cid,
                    ev.causation_id,
                    ev.correlation_id,
                    data,
                    prev,
                    h,
                )
                rows.append(row)
                stored.append(make_event(row, ev.payload, recorded_at))
                prev = h
            staged[sid] = version
            result = AppendResult(tuple(stored), position, version, False)
            accepted.append((req, result))
            if cid is not None:
                in_group[cid] = result
                command_rows.append((cid, sid, first_position, position, version))

        if not rows:
            return
        if self.before_commit is not None:
            await self.before_commit()
        try:
            await self._backend._async_commit(rows, command_rows)
        except BaseException as exc:
            # nothing was written: the caches were never touched, every caller of the group gets the error
            err = exc if isinstance(exc, Exception) else StoreClosedError("the writer was cancelled")
            for req, _ in accepted:
                if not req.future.done():
                    req.future.set_exception(err)
            for req, _ in in_group_dups:
                if not req.future.done():
                    req.future.set_exception(err)
            raise
        self.head_position = position
        self.head_hash = prev
        self.last_recorded_us = recorded_us
        versions.update(staged)
        published: list[StoredEvent] = []
        for req, result in accepted:
            published.extend(result.events)
            if req.command_id is not None:
                recent[req.command_id] = result
                if len(recent) > self.RECENT_COMMANDS:
                    recent.popitem(last=False)
            if not req.future.done():
                req.future.set_result(result)
        for req, cid in in_group_dups:
            if not req.future.done():
                req.future.set_result(replace(in_group[cid], duplicate=True))
        self._publish(published)
