"""VM snapshot rules (CloudStack): at most N per VM, memory only of a running VM, revert by state, the tree.

Pure. Snapshots are ``{id: {"name", "parent", "memory", ...}}`` as the read model keeps them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moldd.domain.errors import Conflict, InvalidState, ValidationError
from moldd.domain.states import Action, VMState, check

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_snapshot_name(value: object, *, field: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationError(
            f"{field} must be 1-64 characters: letters, digits, '_', '.' or '-', starting with a letter or digit",
            field=field,
        )
    return value


def check_create(state: VMState, *, memory: bool, count: int, limit: int) -> None:
    if memory:
        check(state, Action.MEMORY_SNAPSHOT)
    else:
        check(state, Action.SNAPSHOT)
        if state is VMState.RUNNING:
            # An internal qcow2 snapshot of a running domain always holds its RAM.
            raise InvalidState(
                "cannot take a disk-only snapshot of a VM that is Running: internal qcow2 snapshots of a "
                "running VM include its memory; pass snapshotmemory=true or stop the VM first",
                field="snapshotmemory",
            )
    if count >= limit:
        raise Conflict(
            f"the VM already has {count} VM snapshots, the limit is {limit}: delete one first",
            field="id",
            code="snapshot_limit",
        )


def revert_state(state: VMState, *, memory: bool) -> VMState:
    """The state a revert leaves the VM in; refuses a revert the VM's state does not allow."""
    check(state, Action.REVERT)
    if memory:
        return VMState.RUNNING  # RAM and run state come back
    if state is not VMState.STOPPED and state is not VMState.CREATED:
        raise InvalidState(
            f"cannot revert a VM that is {state.value} to a disk-only snapshot: stop the VM first "
            "(only a snapshot with memory reverts a Running VM)",
            field="state",
        )
    return VMState.STOPPED if state is VMState.STOPPED else state


def remove_from_tree(
    snapshots: Mapping[str, Mapping[str, Any]], current: str | None, sid: str
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Delete ``sid``: its children move up to its parent, and if it was current its parent becomes current
    (libvirt does the same with its snapshot metadata)."""
    gone = snapshots.get(sid)
    parent = gone.get("parent") if gone else None
    out: dict[str, dict[str, Any]] = {}
    for key, snap in snapshots.items():
        if key == sid:
            continue
        snap = dict(snap)
        if snap.get("parent") == sid:
            snap["parent"] = parent
        out[key] = snap
    return out, (parent if current == sid else current)
