"""The single writer task with group commit.

Appenders put requests in a queue; the writer drains whatever is queued, checks each request against its
in-memory caches (stream versions, recent command ids), chains the accepted events, commits them in ONE
transaction and only then resolves each caller's future. A request that fails its checks against committed
state fails alone, at once; a failed COMMIT fails the whole group (including requests that were only
duplicates of, or in conflict with, another request of the group) and leaves the caches as they were
(they are only updated after COMMIT). If the writer task ends (cancelled), every queued and later append
fails with StoreClosedError instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
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


def command_from_rows(cid: str, rows: list[Row]) -> tuple[CommandRow, list[Row]]:
    """The append made with `cid`, from the chained rows carrying it (position order): one append is one
    run of consecutive positions on one stream; anything after the first run is not that append (a forged
    row, caught by verify) and is left out."""
    run = [rows[0]]
    for row in rows[1:]:
        prev = run[-1]
        if row[0] != prev[0] + 1 or row[1] != prev[1] or row[2] != prev[2] + 1:
            break
        run.append(row)
    last = run[-1]
    return (cid, run[0][1], run[0][0], last[0], last[2]), run


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
        self._stopped_reason = "the event store is closed"
        # test hook: awaited before each commit (lets tests hold a group open)
        self.before_commit: Callable[[], Awaitable[None]] | None = None
        # metrics hook: (events in the group, seconds the COMMIT took, committed?) after each group
        self.on_commit: Callable[[int, float, bool], None] | None = None
        # set by a backend that other processes may have written (PostgreSQL after a failover or an unknown
        # COMMIT outcome): the next group first reloads the head and forgets the caches
        self.stale = False

    def submit(self, request: AppendRequest) -> None:
        if self._closed:
            raise StoreClosedError(self._stopped_reason)
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

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; what is queued is still written."""
        if not self._closed:
            self._closed = True
            if self._task is not None and not self._task.done():
                self._queue.append(None)
                self._wake()

    async def async_close(self) -> None:
        """Finish what is queued, then stop the writer. Every caller waits until the writer has stopped; the
        writer's own end (even a cancellation) is not raised here."""
        self.stop_accepting()
        task = self._task
        if task is not None:
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: the writer already failed every request it could not finish

    async def _async_run(self) -> None:
        try:
            await self._async_drain()
        except BaseException as exc:  # cancelled (or a bug): nothing may keep waiting on this writer
            self._stopped_reason = f"the event store's writer stopped ({type(exc).__name__})"
            raise
        finally:
            self._closed = True
            stopped = StoreClosedError(self._stopped_reason)
            while self._queue:
                req = self._queue.popleft()
                if req is not None and not req.future.done():
                    req.future.set_exception(stopped)

    async def _async_drain(self) -> None:
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
                _fail(group, exc)
            except BaseException:
                _fail(group, StoreClosedError("the event store's writer was cancelled; nothing was written"))
                raise
            if stop:
                return

    def reset(self, head_position: int, head_hash: bytes, last_recorded_us: int) -> None:
        """Adopt the head as stored and forget the caches (the log may have been written by another process):
        the next group looks its streams and commands up again."""
        self.head_position = head_position
        self.head_hash = head_hash
        self.last_recorded_us = max(self.last_recorded_us, last_recorded_us)
        self._versions.clear()
        self._recent.clear()
        self.stale = False

    async def _async_process(self, group: list[AppendRequest]) -> None:
        if self.stale:
            load: Callable[[], Awaitable[tuple[int, bytes, int]]] = self._backend._async_load_head  # type: ignore[attr-defined]
            self.reset(*(await load()))
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
            for cid, original in found.items():
                self._remember(cid, original)
        plan = self._plan(group, found)
        if not plan.rows:
            return
        if self.before_commit is not None:
            await self.before_commit()
        await self._async_commit_group(plan)

    def _plan(self, group: list[AppendRequest], found: dict[str, AppendResult]) -> _Plan:
        """Check each request against the caches, chain the accepted events, and settle at once every
        request whose outcome does not depend on this group's COMMIT."""
        versions = self._versions
        recent = self._recent
        plan = _Plan()
        rows = plan.rows
        staged = plan.staged
        outcomes = plan.outcomes
        in_group: dict[str, AppendResult] = {}
        position = self.head_position
        prev = self.head_hash
        recorded_us = max(int(self._clock()), self.last_recorded_us)  # time never goes backwards
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
                if original is not None:  # durable already: settled now
                    if not fut.done():
                        fut.set_result(replace(original, duplicate=True))
                    continue
                if cid in in_group:  # a duplicate of a request of this group: stands or falls with it
                    outcomes.append((req, replace(in_group[cid], duplicate=True)))
                    continue
            current = staged[sid] if sid in staged else versions[sid]
            expected = req.expected_version
            if expected != ANY_VERSION and expected != current:
                conflict = ConcurrencyError(sid, expected, current)
                if sid in staged:  # the conflict is with this group's uncommitted events
                    outcomes.append((req, conflict))
                elif not fut.done():
                    fut.set_exception(conflict)
                continue
            version = current
            pos = position
            link = prev
            req_rows: list[Row] = []
            stored: list[StoredEvent] = []
            try:
                for ev in req.events:
                    pos += 1
                    version += 1
                    sv = ev.schema_version
                    data = ev.payload_bytes
                    h = sha256(join((TAG, link, pack_ints(pos, version, recorded_us, sv), ev.fields, data))).digest()
                    row = (
                        pos,
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
                        link,
                        h,
                    )
                    req_rows.append(row)
                    stored.append(make_event(row, ev.payload, recorded_at))  # may run an upcaster
                    link = h
            except Exception as exc:  # this request alone fails; the chain goes on from the previous one
                if not fut.done():
                    fut.set_exception(exc)
                continue
            first_position = position + 1
            position = pos
            prev = link
            rows.extend(req_rows)
            staged[sid] = version
            result = AppendResult(tuple(stored), position, version, False)
            plan.accepted.append((req, result))
            outcomes.append((req, result))
            if cid is not None:
                in_group[cid] = result
                plan.command_rows.append((cid, sid, first_position, position, version))
        plan.head_position = position
        plan.head_hash = prev
        plan.recorded_us = recorded_us
        return plan

    async def _async_commit_group(self, plan: _Plan) -> None:
        """Run the group's COMMIT to its end and settle every caller with its real outcome.

        A cancellation that arrives while the transaction runs (on SQLite's thread it cannot be stopped) first
        waits for the outcome, so that no caller is told "failed" about a group that was written; a second
        cancellation gives up waiting and tells the callers the outcome is unknown.
        """
        started = time.perf_counter()
        commit = asyncio.ensure_future(self._backend._async_commit(plan.rows, plan.command_rows))
        try:
            await asyncio.wait([commit])
        except asyncio.CancelledError:
            try:
                await asyncio.wait([commit])
            finally:
                self._settle(plan, commit)
            raise
        self._settle(plan, commit)
        if self.on_commit is not None:
            ok = not commit.cancelled() and commit.exception() is None
            try:
                self.on_commit(len(plan.rows), time.perf_counter() - started, ok)
            except Exception:  # a metrics bug must not stop the writer
                pass

    def _settle(self, plan: _Plan, commit: asyncio.Future[None]) -> None:
        if not commit.done() or commit.cancelled():
            commit.add_done_callback(_retrieve)
            _fail(
                [req for req, _ in plan.outcomes],
                StoreClosedError(
                    "the event store's writer was cancelled during COMMIT: whether the append was written is "
                    "unknown (look its command id up, or read the stream, after reopening the store)"
                ),
            )
            return
        exc = commit.exception()
        if exc is not None:
            # nothing was written: the caches were never touched, every caller of the group gets the error
            _fail([req for req, _ in plan.outcomes], exc)
            return
        self.head_position = plan.head_position
        self.head_hash = plan.head_hash
        self.last_recorded_us = plan.recorded_us
        self._versions.update(plan.staged)
        published: list[StoredEvent] = []
        for req, result in plan.accepted:
            published.extend(result.events)
            if req.command_id is not None:
                self._remember(req.command_id, result)
        for req, outcome in plan.outcomes:
            if req.future.done():
                continue
            if isinstance(outcome, AppendResult):
                req.future.set_result(outcome)
            else:
                req.future.set_exception(outcome)
        self._publish(published)

    def _remember(self, command_id: str, result: AppendResult) -> None:
        recent = self._recent
        recent[command_id] = result
        if len(recent) > self.RECENT_COMMANDS:
            recent.popitem(last=False)


@dataclass(slots=True)
class _Plan:
    """What one group writes, and what each of its callers is told once the COMMIT's outcome is known."""

    rows: list[Row] = field(default_factory=list)
    command_rows: list[CommandRow] = field(default_factory=list)
    staged: dict[str, int] = field(default_factory=dict)  # stream id -> version after this group
    accepted: list[tuple[AppendRequest, AppendResult]] = field(default_factory=list)
    outcomes: list[tuple[AppendRequest, AppendResult | Exception]] = field(default_factory=list)
    head_position: int = 0
    head_hash: bytes = b""
    recorded_us: int = 0


def _fail(requests: Iterable[AppendRequest], exc: BaseException) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_exception(exc)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
