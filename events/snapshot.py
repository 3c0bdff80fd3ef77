"""Snapshots: a projection's state at position P plus the head hash at P.

The snapshots table is not the log: it may be replaced or dropped at any time. A snapshot whose head hash
no longer matches the log at P (the log was rebuilt or rewritten) is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .envelope import Snapshot

if TYPE_CHECKING:
    from .replay import Projection
    from .store import EventStore

__all__ = ["Snapshot", "async_load_valid_snapshot", "async_take_snapshot"]


async def async_take_snapshot(
    store: EventStore, name: str, projection: Projection[Any], state: Any, position: int
) -> Snapshot:
    """Save `projection.to_snapshot(state)` as the snapshot `name` at `position`."""
    return await store.async_save_snapshot(name, position, projection.to_snapshot(state))


async def async_load_valid_snapshot(store: EventStore, name: str) -> Snapshot | None:
    """The snapshot `name` if the log still has the same head hash at its position, else None."""
    snap = await store.async_load_snapshot(name)
    if snap is None:
        return None
    if await store.async_hash_at(snap.position) != snap.head_hash:
        return None
    return snap
