"""Keeps the read model in step with the log: restore from the newest snapshot, replay the tail, then follow
live commits. Waiters can block until a position is folded; listeners (HA, capacity warnings) are told of
every event after it is applied, in log order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import inspect
import io
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson
import structlog

from events import EventStore, SQLiteEventStore, StoredEvent
from events.canonical import canonical_text
from events.snapshot import async_load_sealed_snapshot, async_save_sealed_snapshot_data
from moldd.projection import readmodel
from moldd.projection.model import Captured
from moldd.projection.readmodel import STORED_TO_FOLD, ReadModel

if TYPE_CHECKING:  # (imported with a key: moldd.daemon loads it only when one is configured)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = structlog.get_logger("moldd.projector")
SNAPSHOT_NAME = "moldd.readmodel"

Listener = Callable[[StoredEvent, ReadModel], None]
T = TypeVar("T")


RESTORE_BATCH = 5000
SNAPSHOT_CPU_SHARE = 0.1
"""Background snapshots may use at most this share of the time: after a snapshot that took T seconds the next
waits at least T / SNAPSHOT_CPU_SHARE (a big model is snapshotted less often than every snapshot_every events)."""
STOP_SNAPSHOT_TIMEOUT_S = 5.0
"""async_stop waits at most this long for its final snapshot (the tail since the last one is replayed next start)."""
STOP_SNAPSHOT_CHEAP_S = 0.5
"""A final snapshot estimated to take at most this long is written at a stop however few events it adds; a dearer
one only when at least ``snapshot_every`` events were folded since the newest snapshot (and it fits in time)."""
SNAPSHOT_S_PER_RECORD = 50e-6
"""The estimate of a snapshot's time per read-model record (encode on a thread + store) before one was measured:
~35 µs on a quiet 2-core machine (10,000 VMs and 10,000 jobs: 0.7 s), with a margin."""


class Projector:
    def __init__(
        self, store: EventStore, *, snapshot_every: int = 1000, seal_key: Ed25519PrivateKey | None = None
    ) -> None:
        self.store = store
        self.seal_key = seal_key  # Ed25519 private key (the checkpoint key): seals are signed, only signed ones trusted
        self.model = ReadModel()
        self.snapshot_every = snapshot_every
        self.listeners: list[Listener] = []  # use add_listener (the list itself stays for existing callers)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._since_snapshot = 0
        self._sealed_at = 0  # log position of the seal of the newest snapshot taken or loaded
        # a snapshot appends its seal to the log: in a cluster only the leader may (moldd.cluster sets this)
        self.may_snapshot: Callable[[], bool] = lambda: True
        self._snapshot_task: asyncio.Task[None] | None = None
        self._next_snapshot_at = 0.0  # time.monotonic() before which no background snapshot starts
        self.snapshot_position = 0  # position of the newest snapshot this projector wrote or loaded
        self.last_snapshot_s = 0.0  # how long the newest snapshot this projector wrote took (encode + store)
        self._last_snapshot_records = 0  # and how many records it held
        self.failed: BaseException | None = None

    async def async_load_snapshot(self) -> int:
        """Load the newest snapshot if the log vouches for it (a seal in the chain records its digest, and
        the log's hash at its position is its head hash); otherwise warn and keep an empty model, so the
        whole log is folded. Returns the snapshot's position (0: none used)."""
        public = None if self.seal_key is None else self.seal_key.public_key()
        with _collector_paused():  # millions of objects decoded and built: each full pass would walk them all
            snap, why, seal_at = await async_load_sealed_snapshot(self.store, SNAPSHOT_NAME, public)
            if snap is None:
                if why is not None:
                    log.warning("snapshot_ignored", reason=why, folding="the whole log")
                return 0
            try:
                model = ReadModel.from_dict(snap.state)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("snapshot_ignored", reason=f"cannot be read: {exc!r}", folding="the whole log")
                return 0
            position = snap.position
            del snap  # its decoded state: garbage now
        if model.position != position:
            log.warning("snapshot_ignored", reason="its state is not at its position", folding="the whole log")
            return 0
        self.model = model
        self._sealed_at = seal_at
        self.snapshot_position = position
        return position

    async def async_restore(self) -> None:
        """Load the newest sealed snapshot (async_load_snapshot) unless done, and fold the tail."""
        if self.model.position == 0:
            await self.async_load_snapshot()
        # the next batch is read (on a thread) while this one is folded; rows, not StoredEvents: the fold decodes
        # the payloads and keeps the times as stored (ReadModel.apply_rows)
        read = fold_reader(self.store)
        up = self.store.upcasters
        current = up.known if up is not None else {}
        upcast = up.upcast if up is not None else _no_upcast
        pending = asyncio.ensure_future(read(self.model.position + 1, RESTORE_BATCH))
        paused = _collector_paused()  # at start-up, for the whole replay: its passes would walk the growing model
        paused.__enter__()
        try:
            while True:
                batch = await pending
                if not batch:
                    break
                pending = asyncio.ensure_future(read(batch[-1][0] + 1, RESTORE_BATCH))
                self.model.apply_rows(batch, current, upcast)
        finally:
            paused.__exit__(None, None, None)
            if not pending.done():
                pending.cancel()
                await asyncio.wait({pending})  # its end is not ours to raise; our own cancellation still propagates
                if not pending.cancelled():
                    pending.exception()  # retrieved (not reported as "never retrieved")
        await self.store.async_release_memory()  # the page cache the replay filled (~16 MiB for SQLite)
        log.info("projection_restored", position=self.model.position, vms=len(self.model.vms))

    def start(self, *, snapshot_tail: bool = True) -> None:
        """Follow live commits. Unless ``snapshot_tail`` is false, also ``snapshot_tail()`` now (the daemon
        calls it itself once ready: the snapshot's encoding would otherwise compete with the rest of its start)."""
        self._task = asyncio.create_task(self._async_follow(), name="projector")
        if snapshot_tail:
            self.snapshot_tail()

    def snapshot_tail(self) -> None:
        """If the restore folded a long tail (``snapshot_every`` events or more since the snapshot it started
        from), snapshot it soon, in the background, so that the next start does not fold it again even if the
        final snapshot at stop does not fit in its time limit."""
        if self.model.position - self.snapshot_position >= self.snapshot_every:
            self._start_background_snapshot()

    async def async_stop(self, *, snapshot: bool = True, snapshot_timeout: float = STOP_SNAPSHOT_TIMEOUT_S) -> None:
        """Stop following; then, unless ``snapshot`` is false, write a final snapshot if it is worth it and fits in
        ``snapshot_timeout`` seconds. A stop is never held up longer, and correctness never depends on this
        snapshot: without it the next start folds the tail since the newest snapshot (a running background
        snapshot is waited for within the same time; background snapshots are written every ``snapshot_every``
        events, so that tail stays short). Skipped at once when fewer than ``snapshot_every`` events were folded
        since the newest snapshot and it is not cheap (``snapshot_estimate_s()`` > STOP_SNAPSHOT_CHEAP_S: folding
        them at the next start costs milliseconds, a snapshot of a big model seconds), or when its estimate exceeds
        the time left; one that still overruns is given up at the deadline."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not snapshot:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + snapshot_timeout
        running = self._snapshot_task
        if running is not None and not running.done():
            try:
                await asyncio.wait_for(asyncio.shield(running), snapshot_timeout)
            except TimeoutError:
                log.warning("snapshot_skipped_at_stop", reason="a background snapshot is still being written",
                            timeout_s=snapshot_timeout, position=self.model.position)  # fmt: skip
                return
            except Exception:
                pass  # logged by the background task
        if not self.may_snapshot() or self.model.position <= self._sealed_at:
            return
        tail = self.model.position - self.snapshot_position
        estimate = self.snapshot_estimate_s()
        if tail < self.snapshot_every and estimate > STOP_SNAPSHOT_CHEAP_S:
            log.info("snapshot_skipped_at_stop", reason="few events since the newest snapshot", events=tail,
                     estimate_s=round(estimate, 3), snapshot_position=self.snapshot_position,
                     position=self.model.position)  # fmt: skip
            return
        left = deadline - loop.time()  # (less what waiting for a background snapshot took)
        if estimate > left:
            log.warning("snapshot_skipped_at_stop", reason="it would take longer than a stop may wait",
                        estimate_s=round(estimate, 3), timeout_s=snapshot_timeout, left_s=round(left, 3),
                        events=tail, position=self.model.position)  # fmt: skip
            return
        try:
            await asyncio.wait_for(self.async_snapshot(), max(0.0, left))
        except TimeoutError:
            log.warning("snapshot_skipped_at_stop", reason="it did not fit in the time a stop may wait",
                        timeout_s=snapshot_timeout, events=tail, position=self.model.position)  # fmt: skip
        except Exception:
            log.exception("snapshot_failed", position=self.model.position)

    def snapshot_estimate_s(self) -> float:
        """How long a snapshot of the model would take: the newest one this projector wrote, scaled to the
        model's size now; before any, SNAPSHOT_S_PER_RECORD per record."""
        records = len(self.model.vms) + len(self.model.jobs) + len(self.model.hosts) + len(self.model.groups)
        if self.last_snapshot_s > 0 and self._last_snapshot_records > 0:
            return self.last_snapshot_s * records / self._last_snapshot_records
        return records * SNAPSHOT_S_PER_RECORD

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, model)`` after every live event is folded, in log order, on the loop thread.

        A listener is a callback: it must not block or await (a coroutine function is refused with ``TypeError``;
        start a task from it if needed), and its exceptions are logged, never stop the projection. Returns the
        unsubscribe handle: call it to stop (again: no effect), also from inside the listener."""
        if inspect.iscoroutinefunction(listener):
            raise TypeError(f"a projector listener must be a plain callback, not a coroutine function: {listener!r}")
        self.listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self.listeners.remove(listener)

        return unsubscribe

    async def _async_follow(self) -> None:
        try:
            async for ev in self.store.async_subscribe(from_position=self.model.position + 1):
                self.model.apply(ev)
                for listener in tuple(self.listeners):  # a listener may unsubscribe (itself) meanwhile
                    try:
                        listener(ev, self.model)
                    except Exception:  # a listener's bug must not stop the projection
                        log.exception(
                            "projection_listener_failed", listener=repr(listener), position=ev.position
                        )
                self._wake()
                self._since_snapshot += 1
                if self._since_snapshot >= self.snapshot_every:
                    self._start_background_snapshot()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failed = exc
            log.exception("projector_failed")
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(RuntimeError("the projection stopped"))
            raise

    def _wake(self) -> None:
        pos = self.model.position
        keep = []
        for target, fut in self._waiters:
            if target <= pos:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def async_wait(self, position: int, timeout: float = 10.0) -> None:
        """Return once the read model has folded ``position``."""
        if self.model.position >= position:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((position, fut))
        await asyncio.wait_for(fut, timeout)

    def _start_background_snapshot(self) -> None:
        """A snapshot in its own task: the fold goes on while it is encoded and written; one at a time."""
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        if time.monotonic() < self._next_snapshot_at or not self.may_snapshot():
            return
        self._since_snapshot = 0
        self._snapshot_task = asyncio.create_task(self._async_background_snapshot(), name="projector-snapshot")

    async def _async_background_snapshot(self) -> None:
        t0 = time.monotonic()
        try:
            await self._async_write_snapshot()
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed snapshot costs only start-up time: the log is the truth
            log.exception("snapshot_failed", position=self.model.position)
        took = time.monotonic() - t0
        self._next_snapshot_at = time.monotonic() + took / SNAPSHOT_CPU_SHARE
        with contextlib.suppress(Exception):  # the store closing meanwhile: nothing to release
            # the store's page cache, which writing the snapshot filled with its pages (16 MiB for SQLite)
            await self.store.async_release_memory()
        release_freed_memory()  # the encoding's many small buffers

    async def async_snapshot(self) -> None:
        """Seal and write a snapshot of the model as it is now (nothing when nothing but the last seal happened
        since) (after any background snapshot still running)."""
        running = self._snapshot_task
        if running is not None and not running.done():
            await asyncio.shield(running)
        if self.model.position > self._sealed_at and self.may_snapshot():
            await self._async_write_snapshot()

    async def _async_write_snapshot(self) -> None:
        """Capture the model's views on the loop (no fold between: a consistent state), encode them to the
        snapshot's JSON (sorted keys, orjson) on a daemon thread, one object at a time (the GIL goes back to the
        loop between objects), then seal and store the bytes."""
        model = self.model
        position = model.position
        if position <= 0:
            return
        t0 = time.monotonic()
        box = [model.snapshot_parts()]  # taken by the encoding thread: the captured rows go once encoded
        records = sum(len(v.rows) for v in box[0].values() if isinstance(v, Captured))
        data = await _async_in_daemon_thread(lambda: encode_snapshot(box.pop()))
        _, sealed_at = await async_save_sealed_snapshot_data(
            self.store, SNAPSHOT_NAME, position, data, key=self.seal_key
        )
        self._sealed_at = max(self._sealed_at, sealed_at)
        self.snapshot_position = max(self.snapshot_position, position)
        self.last_snapshot_s = time.monotonic() - t0
        self._last_snapshot_records = records


FoldReader = Callable[[int, int], Awaitable[list[Any]]]


def fold_reader(store: EventStore) -> FoldReader:
    """``read(from_position, limit)``: the stored rows from a position on, in the fold's column order
    (``FOLD_COLUMNS``). On a SQLite log with the fold's C accelerator built (``readmodel.ACCELERATOR``), only
    those columns, read on a thread over a read-only connection of its own (no hashes, no Python sqlite3 row
    objects; the GIL is released while SQLite reads); a batch it does not vouch for, and every other store, are
    read through ``store.async_read_rows``. The chain is not checked here: the daemon verifies it meanwhile
    (``moldd.integrity.async_verify_at_start``) and acts on the model only once both are done."""
    accel = readmodel.ACCELERATOR
    path = getattr(store, "path", None) if isinstance(store, SQLiteEventStore) else None
    uri = Path(path).resolve().as_uri() + "?mode=ro" if accel is not None and isinstance(path, Path) else None

    async def async_read_stored(start: int, limit: int) -> list[Any]:
        return list(map(STORED_TO_FOLD, await store.async_read_rows(start, limit)))

    if uri is None:
        return async_read_stored

    async def async_read(start: int, limit: int) -> list[Any]:
        rows: list[Any] | None = await asyncio.to_thread(accel.read, uri, start, 2**62, limit)
        return await async_read_stored(start, limit) if rows is None else rows

    return async_read


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): freed memory
    between live blocks otherwise stays in the process after a burst (a start-up, a snapshot). Some
    milliseconds for a heap of a few hundred MiB."""
    trim = _MALLOC_TRIM
    if trim is not None:
        trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile (as it was after): for start-up's bulk loads, which make no
    cycles (the daemon freezes what they built once ready, moldd.daemon)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _no_upcast(event_type: str, version: int, payload: Any) -> tuple[int, Any]:
    return version, payload


def encode_snapshot(parts: dict[str, Any]) -> bytes:
    """JSON of ``parts`` (keys to scalars, to dicts, or to ``Captured`` records) with sorted keys, built one
    record at a time with orjson (the canonical encoder where orjson refuses a value): it decodes to exactly
    what ``canonical_json(model.to_dict())`` decodes to, and the GIL goes back to the loop between records."""
    out = io.BytesIO()  # written piece by piece: each of orjson's outputs holds its whole buffer until freed
    write = out.write
    write(b"{")
    for i, key in enumerate(sorted(parts)):
        if i:
            write(b",")
        write(_encode(key))
        write(b":")
        value = parts[key]
        if isinstance(value, (dict, Captured)):
            names: dict[str, Any] = value.rows if isinstance(value, Captured) else value
            record: Callable[[str], Any] = value.record if isinstance(value, Captured) else value.__getitem__
            write(b"{")
            for j, name in enumerate(sorted(names)):
                if j:
                    write(b",")
                write(_encode(name))
                write(b":")
                write(_encode(record(name)))
            write(b"}")
        else:
            write(_encode(value))
    write(b"}")
    return out.getvalue()


def _encode(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits, a non-string key
        return canonical_text(value).encode("utf-8")


async def _async_in_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a daemon thread: unlike the default executor, a thread still running when the loop ends does
    not hold up the process's exit (a stop that gave up waiting for a snapshot exits at once)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="moldd-snapshot", daemon=True).start()
    return await fut
