"""Replay: fold the log into a projection's state, starting from its newest valid snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .envelope import StoredEvent
from .snapshot import async_load_valid_snapshot

if TYPE_CHECKING:
    from .store import EventStore

S = TypeVar("S")

REPLAY_BATCH = 5000


class Projection(Protocol[S]):
    """A pure fold of events into a state."""

    def initial(self) -> S: ...

    def apply(self, state: S, event: StoredEvent) -> S: ...

    def to_snapshot(self, state: S) -> dict[str, Any]: ...

    def from_snapshot(self, data: dict[str, Any]) -> S: ...


@dataclass(frozen=True, slots=True)
class Replayed(Generic[S]):
    """What a replay produced: the state, the last position applied, and the snapshot used (if any)."""

    state: S
    position: int
    snapshot_position: int | None


async def async_replay(
    store: EventStore,
    projection: Projection[S],
    snapshot_name: str | None = None,
    to_position: int | None = None,
) -> Replayed[S]:
    """Load the newest valid snapshot (if `snapshot_name`), then apply the tail of the log."""
    state: S | None = None
    position = 0
    snap_position: int | None = None
    if snapshot_name is not None:
        snap = await async_load_valid_snapshot(store, snapshot_name)
        if snap is not None and (to_position is None or snap.position <= to_position):
            state = projection.from_snapshot(snap.state)
            position = snap_position = snap.position
    if state is None:
        state = projection.initial()
    apply = projection.apply
    while True:
        batch = await store.async_read(position + 1, to_position, limit=REPLAY_BATCH)
        for ev in batch:
            state = apply(state, ev)
        if batch:
            position = batch[-1].position
        if len(batch) < REPLAY_BATCH:
            break
    return Replayed(state, position, snap_position)


async def async_fold(store: EventStore, projection: Projection[S], snapshot_name: str | None = None) -> S:
    """The projection's state after every committed event (snapshot + tail, or a full replay)."""
    return (await async_replay(store, projection, snapshot_name)).state
