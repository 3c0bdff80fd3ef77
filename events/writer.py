"""The single writer task with group commit.

Appenders put requests in a queue; the writer drains whatever is queued, checks each request against its
in-memory caches (stream versions, recent command ids), chains the accepted events, commits them in ONE
transaction and only then resolves each caller's future. A request that fails its checks against committed
state fails alone, at once; a failed COMMIT fails the whole group (including requests that were only
duplicates of, or in conflict with, another request of the group) and leaves the caches as they were
(they are only updated after COMMIT). If the writer task ends (cancelled), every queued and later append
fails with StoreClosedError instead of waiting forever.

Pipelining (a backend with ``writer_pipeline_depth`` = 2, e.g. SQLite, whose commits run in order on one
thread): requests that arrive while group N's COMMIT runs are planned (checks, chain, SHA-256) and handed over
as group N+1 at once, not after N's COMMIT.
Group N+1 is chained onto N's uncommitted head, so its requests that depend on group N (a retried command id
of N, a conflict with a version N writes) stand or fall with N, exactly like requests of one group; and if
N's COMMIT fails, N+1 fails with it (the backend refuses a group that does not start right after its stored
head, so a group planned on a failed one can never be written). Only then does planning go on from the
committed state.

Hops: a group's COMMIT is handed to the backend's own thread when the backend offers ``_start_commit`` (SQLite),
which calls back on the loop once it is settled: the callback itself tells the group's callers (no task, no
future in between). Requests that arrive while the writer is idle with nothing in flight, whose stream
versions and command ids are already known (no lookup), are planned and handed over by one plain callback
scheduled by ``submit`` (after the loop's ready callbacks, so that the appenders woken by one COMMIT still
form one group), without waking the writer task (the fast path: one appender's append is one hop to the
COMMIT's thread and one back). Everything else goes through the writer task as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple, Protocol

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


class PreparedEvent(NamedTuple):
    """An event validated and encoded by the caller, before the writer assigns its place in the log.
    (A NamedTuple: made with ``tuple.__new__`` on the append path, no Python-level ``__init__``.)"""

    event_type: str
    schema_version: int
    actor: str
    causation_id: str | None
    correlation_id: str | None
    fields: bytes
    payload_bytes: bytes
    payload: dict[str, Any]


class AppendRequest(NamedTuple):
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
        """Write rows and command rows in one durable transaction, or raise and write nothing.

        With ``writer_pipeline_depth`` > 1, calls must be carried out in the order they were made, and a call
        whose first row is not the one right after the stored head must raise and write nothing."""
        ...


CommitDone = Callable[[Any, BaseException | None], None]
"""Called on the event loop's thread, once: (anything, None) when the group was written, (None, what the COMMIT
raised) when it was not."""


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
        # groups whose COMMIT was handed to the backend and not settled yet, oldest first; planning goes on
        # from the newest one's head, stream versions and command ids
        self._depth = max(1, int(getattr(backend, "writer_pipeline_depth", 1)))
        self._inflight: deque[_InFlight] = deque()
        self._pending_versions: dict[str, tuple[int, _Plan]] = {}
        self._pending_commands: dict[str, tuple[AppendResult, _Plan]] = {}
        self._poisoned: BaseException | None = None  # a COMMIT failed: what is in flight behind it fails too
        # requests waiting for the writer (None = stop); the writer sleeps on _wakeup when it is empty
        self._queue: deque[AppendRequest | None] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        # what the sleeping writer waits for: "work" (a request: submit wakes it) or "settle" (the oldest group in
        # flight to be settled: the COMMIT's callback wakes it); None while it runs
        self._waiting: str | None = None
        self._flush_soon = False  # the fast path's callback is scheduled
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
        elif self._waiting == "work" and self._fast(request):
            # the fast path: the writer sleeps with nothing in flight and the request needs no lookup; it is
            # planned and handed over by a plain callback after the loop's ready callbacks (so the other appenders
            # woken by the same COMMIT join its group), without waking the writer task
            self._queue.append(request)
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._queue.append(request)
        if self._waiting == "work":
            self._wake()

    def _fast(self, request: AppendRequest) -> bool:
        """Whether `request` may take the fast path: nothing in flight, no lookup, no test hook."""
        return (
            not self._inflight
            and not self.stale
            and self.before_commit is None
            and request.stream_id in self._versions
            and (request.command_id is None or request.command_id in self._recent)
        )

    def _flush(self) -> None:
        """The fast path's callback: plan what is queued now as one group and hand its COMMIT over, if the writer
        still sleeps with nothing in flight and no queued request needs a lookup; else wake the writer."""
        self._flush_soon = False
        queue = self._queue
        if self._waiting != "work" or not queue:
            return
        if not all(r is not None and self._fast(r) for r in queue):
            self._wake()
            return
        group: list[AppendRequest] = []
        n = 0
        while queue and (not group or n < self._max_group_events):
            req = queue.popleft()
            assert req is not None  # stop_accepting wakes the writer: it is not sleeping for work then
            group.append(req)
            n += len(req.events)
        try:
            plan = self._plan(group, {})
            if plan.rows:
                self._start_commit(plan)
        except Exception as exc:  # as in the writer task: this group fails, the writer goes on
            _fail(group, exc)
        if queue:  # more than one group's worth: the writer takes the rest
            self._wake()

    def _wake(self) -> None:
        self._waiting = None
        w = self._wakeup
        if w is not None:
            self._wakeup = None
            if not w.done():
                w.set_result(None)

    async def _async_sleep(self, waiting: str) -> None:
        """Sleep until woken for `waiting` ("work" or "settle") or by stop_accepting."""
        wakeup = self._wakeup = asyncio.get_running_loop().create_future()
        self._waiting = waiting
        try:
            await wakeup
        finally:
            self._waiting = None
            if self._wakeup is wakeup:
                self._wakeup = None

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
        inflight = self._inflight
        stop = False
        try:
            while True:
                if inflight and (stop or len(inflight) >= self._depth or self._poisoned is not None):
                    await self._async_sleep("settle")  # the COMMIT's callback settles it and wakes us
                    continue
                if stop:
                    return
                if not queue:
                    await self._async_sleep("work")
                    continue
                # Everything that waits goes into one group. (Splitting it in two pipelined halves, so that the
                # second is planned while the first commits, measured slower: twice the COMMITs, and SQLite's
                # thread then waits for the GIL while this thread plans.)
                group: list[AppendRequest] = []
                n = 0
                while queue and (not group or n < self._max_group_events):
                    req = queue.popleft()
                    if req is None:
                        stop = True
                        break
                    group.append(req)
                    n += len(req.events)
                if not group:
                    continue
                try:
                    await self._async_process(group)
                except Exception as exc:  # the writer must survive a failed group
                    _fail(group, exc)
                except BaseException:
                    _fail(group, StoreClosedError("the event store's writer was cancelled; nothing was written"))
                    raise
        except asyncio.CancelledError:
            await self._async_finish_after_cancel()
            raise

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
        if self.stale and not self._inflight:
            load: Callable[[], Awaitable[tuple[int, bytes, int]]] = self._backend._async_load_head  # type: ignore[attr-defined]
            self.reset(*(await load()))
        versions = self._versions
        recent = self._recent
        pending_v = self._pending_versions
        pending_c = self._pending_commands
        need_streams = {r.stream_id for r in group if r.stream_id not in versions and r.stream_id not in pending_v}
        need_commands = {
            r.command_id
            for r in group
            if r.command_id is not None and r.command_id not in recent and r.command_id not in pending_c
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
        self._start_commit(plan)

    def _plan(self, group: list[AppendRequest], found: dict[str, AppendResult]) -> _Plan:
        """Check each request against the caches, chain the accepted events, and settle at once every
        request whose outcome does not depend on this group's COMMIT."""
        versions = self._versions
        recent = self._recent
        pending_v = self._pending_versions
        pending_c = self._pending_commands
        plan = _Plan()
        rows = plan.rows
        staged = plan.staged
        outcomes = plan.outcomes
        in_group: dict[str, AppendResult] = {}
        if self._inflight:  # chained onto the newest group in flight
            last = self._inflight[-1].plan
            position, prev, last_us = last.head_position, last.head_hash, last.recorded_us
        else:
            position, prev, last_us = self.head_position, self.head_hash, self.last_recorded_us
        recorded_us = max(int(self._clock()), last_us)  # time never goes backwards
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
                if cid in pending_c:  # a duplicate of a group in flight: stands or falls with that group
                    result, owner = pending_c[cid]
                    owner.outcomes.append((req, replace(result, duplicate=True)))
                    continue
            if sid in staged:
                current = staged[sid]
            elif sid in pending_v:
                current = pending_v[sid][0]
            else:
                current = versions[sid]
            expected = req.expected_version
            if expected != ANY_VERSION and expected != current:
                conflict = ConcurrencyError(sid, expected, current)
                if sid in staged:  # the conflict is with this group's uncommitted events
                    outcomes.append((req, conflict))
                elif sid in pending_v:  # ... with a group in flight: told once that group's outcome is known
                    pending_v[sid][1].outcomes.append((req, conflict))
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

    def _start_commit(self, plan: _Plan) -> None:
        """Hand the group's COMMIT to the backend (its own thread, or a task of its own: cancelling the writer
        cannot stop it) and plan further groups on top of it."""
        item = _InFlight(plan, time.perf_counter())
        backend = self._backend
        start: Callable[[list[Row], list[CommandRow], CommitDone], bool] | None = getattr(
            backend, "_start_commit", None
        )
        if start is None or not start(plan.rows, plan.command_rows, partial(self._commit_done, item)):
            task = asyncio.ensure_future(backend._async_commit(plan.rows, plan.command_rows))
            item.task = task
            task.add_done_callback(partial(self._task_done, item))
        self._inflight.append(item)
        pending_v = self._pending_versions
        for sid, version in plan.staged.items():
            pending_v[sid] = (version, plan)
        pending_c = self._pending_commands
        for req, result in plan.accepted:
            if req.command_id is not None:
                pending_c[req.command_id] = (result, plan)

    def _task_done(self, item: _InFlight, task: asyncio.Future[None]) -> None:
        if task.cancelled():  # the loop is shutting down: whether it was written is unknown
            item.unknown = True
            self._commit_done(item, None, None)
        else:
            self._commit_done(item, None, task.exception())

    def _commit_done(self, item: _InFlight, _result: object, exc: BaseException | None) -> None:
        """A COMMIT is settled (on the loop's thread): tell the callers of every group whose outcome is now known,
        oldest first, and wake the writer if it waits for that."""
        if item.settled:  # already told "unknown" (the writer was cancelled twice)
            return
        item.done = True
        item.error = exc
        inflight = self._inflight
        try:
            while inflight and inflight[0].done:
                self._settle_oldest()
        finally:  # (a loop callback: whatever happens, a writer waiting for this must not sleep on)
            if self._waiting == "settle":
                self._wake()

    async def _async_finish_after_cancel(self) -> None:
        """The writer was cancelled: the COMMITs in flight cannot be stopped (they run on SQLite's thread), so
        first wait for their outcomes, so that no caller is told "failed" about a group that was written; a
        second cancellation gives up waiting and tells the callers the outcome is unknown."""
        try:
            while self._inflight:
                await self._async_sleep("settle")
        finally:
            while self._inflight:
                self._settle_oldest()

    def _settle_oldest(self) -> None:
        item = self._inflight.popleft()
        item.settled = True
        took = time.perf_counter() - item.started
        plan = item.plan
        try:
            ok = self._settle(item)
        finally:
            if self._inflight:  # forget what this group staged for planning (later groups keep theirs)
                self._pending_versions = {sid: v for sid, v in self._pending_versions.items() if v[1] is not plan}
                self._pending_commands = {c: v for c, v in self._pending_commands.items() if v[1] is not plan}
            else:
                self._pending_versions = {}
                self._pending_commands = {}
                self._poisoned = None
        if self.on_commit is not None and item.done:
            try:
                self.on_commit(len(plan.rows), took, ok)
            except Exception:  # a metrics bug must not stop the writer
                pass

    def _settle(self, item: _InFlight) -> bool:
        """Tell every caller of the group its real outcome; True if the group was written."""
        plan = item.plan
        if not item.done or item.unknown:
            if item.task is not None:
                item.task.add_done_callback(_retrieve)
            _fail(
                [req for req, _ in plan.outcomes],
                StoreClosedError(
                    "the event store's writer was cancelled during COMMIT: whether the append was written is "
                    "unknown (look its command id up, or read the stream, after reopening the store)"
                ),
            )
            return False
        exc = item.error
        if exc is not None or self._poisoned is not None:
            # nothing was written: the caches were never touched, every caller of the group gets the error (a
            # group chained onto a failed one gets that one's error: the backend refused it for that reason)
            if self._poisoned is not None:
                exc = self._poisoned
            elif self._inflight:
                self._poisoned = exc
            assert exc is not None
            _fail([req for req, _ in plan.outcomes], exc)
            return False
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
            fut = req.future
            if fut.done():
                continue
            if isinstance(outcome, AppendResult):
                fut.set_result(outcome)
            else:
                fut.set_exception(outcome)
        self._publish(published)
        return True

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


@dataclass(slots=True)
class _InFlight:
    plan: _Plan
    started: float
    task: asyncio.Future[None] | None = None  # the backend's coroutine, when it has no thread of its own
    done: bool = False  # the COMMIT's outcome is known (error: what it raised)
    error: BaseException | None = None
    settled: bool = False  # its callers were told
    unknown: bool = False  # its task was cancelled: the outcome cannot be known here


def _fail(requests: Iterable[AppendRequest], exc: BaseException) -> None:
    for req in requests:
        if not req.future.done():
            req.future.set_exception(exc)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
