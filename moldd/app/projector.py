"""Keeps the read model in step with the log: restore from the newest snapshot, replay the tail, then follow
live commits. Waiters can block until a position is folded; listeners (HA, capacity warnings) are told of
every event after it is applied, in log order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from events import StoredEvent
from events.snapshot import async_load_sealed_snapshot, async_save_sealed_snapshot
from moldd.projection.readmodel import ReadModel

log = structlog.get_logger("moldd.projector")
SNAPSHOT_NAME = "moldd.readmodel"

Listener = Callable[[StoredEvent, ReadModel], None]


class Projector:
    def __init__(self, store: Any, *, snapshot_every: int = 1000) -> None:
        self.store = store
        self.model = ReadModel()
        self.snapshot_every = snapshot_every
        self.listeners: list[Listener] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._since_snapshot = 0
        self._sealed_at = 0  # log position of the seal of the newest snapshot taken or loaded
        self.failed: BaseException | None = None

    async def async_load_snapshot(self) -> int:
        """Load the newest snapshot if the log vouches for it (a seal in the chain records its digest, and
        the log's hash at its position is its head hash); otherwise warn and keep an empty model, so the
        whole log is folded. Returns the snapshot's position (0: none used)."""
        snap, why, seal_at = await async_load_sealed_snapshot(self.store, SNAPSHOT_NAME)
        if snap is None:
            if why is not None:
                log.warning("snapshot_ignored", reason=why, folding="the whole log")
            return 0
        try:
            model = ReadModel.from_dict(snap.state)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("snapshot_ignored", reason=f"cannot be read: {exc!r}", folding="the whole log")
            return 0
        if model.position != snap.position:
            log.warning("snapshot_ignored", reason="its state is not at its position", folding="the whole log")
            return 0
        self.model = model
        self._sealed_at = seal_at
        return snap.position

    async def async_restore(self) -> None:
        """Load the newest sealed snapshot (async_load_snapshot) unless done, and fold the tail."""
        if self.model.position == 0:
            await self.async_load_snapshot()
        while True:
            batch = await self.store.async_read(from_position=self.model.position + 1, limit=5000)
            if not batch:
                break
            for ev in batch:
                self.model.apply(ev)
        log.info("projection_restored", position=self.model.position, vms=len(self.model.vms))

    def start(self) -> None:
        self._task = asyncio.create_task(self._async_follow(), name="projector")

    async def async_stop(self, *, snapshot: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if snapshot:
            with contextlib.suppress(Exception):
                await self.async_snapshot()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _async_follow(self) -> None:
        try:
            async for ev in self.store.async_subscribe(from_position=self.model.position + 1):
                self.model.apply(ev)
                for listener in self.listeners:
                    try:
                        listener(ev, self.model)
                    except Exception:  # a listener's bug must not stop the projection
                        log.exception(
                            "projection_listener_failed", listener=repr(listener), position=ev.position
                        )
                self._wake()
                self._since_snapshot += 1
                if self._since_snapshot >= self.snapshot_every:
                    self._since_snapshot = 0
                    await self.async_snapshot()
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

    async def async_snapshot(self) -> None:
        """Seal and store the model (nothing when nothing but the last seal happened since)."""
        if self.model.position > self._sealed_at:
            _, self._sealed_at = await async_save_sealed_snapshot(
                self.store, SNAPSHOT_NAME, self.model.position, self.model.to_dict()
            )
