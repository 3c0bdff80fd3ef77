"""Every event type moldd writes to its log, with the schema version this code writes and reads.

This is the registry ``moldd-audit verify`` checks a log against (unknown types and versions from the future)
and the place an upcaster for an old schema version is registered. ``tests/audit/test_eventtypes.py`` scans
``moldd/`` for event types passed to ``NewEvent(...)`` / ``async_record(...)`` and fails when one is missing
here: add the type (and bump its version when its payload changes incompatibly, with an upcaster).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from events import Upcasters

_TYPES: dict[str, int] = {
    # VM lifecycle (moldd/app/lifecycle.py)
    "vm.deploy.requested": 1,
    "vm.deploy.failed": 1,
    "vm.created": 1,
    "vm.start.requested": 1,
    "vm.started": 1,
    "vm.start.failed": 1,
    "vm.stop.requested": 1,
    "vm.stopped": 1,
    "vm.stop.failed": 1,
    "vm.reboot.requested": 1,
    "vm.rebooted": 1,
    "vm.reboot.failed": 1,
    "vm.destroy.requested": 1,
    "vm.destroyed": 1,
    "vm.destroy.failed": 1,
    "vm.recovered": 1,
    "vm.expunge.requested": 1,
    "vm.expunged": 1,
    "vm.expunge.failed": 1,
    "vm.updated": 1,
    # operations (moldd/app/operations.py)
    "vm.settings.changed": 1,
    "vm.offering.changed": 1,
    "vm.scale.requested": 1,
    "vm.scaled": 1,
    "vm.scale.failed": 1,
    "vm.volume.resize.requested": 1,
    "vm.volume.resized": 1,
    "vm.volume.resize.failed": 1,
    "vm.migrate.requested": 1,
    "vm.migrate.progress": 1,
    "vm.migrated": 1,
    "vm.migrate.failed": 1,
    "vm.restore.requested": 1,
    "vm.restored": 1,
    "vm.restore.failed": 1,
    "vm.iso.attach.requested": 1,
    "vm.iso.attached": 1,
    "vm.iso.attach.failed": 1,
    "vm.iso.detach.requested": 1,
    "vm.iso.detached": 1,
    "vm.iso.detach.failed": 1,
    "cluster.capacity_low": 1,
    "vm.console.opened": 1,
    # VM snapshots (moldd/app/snapshots.py)
    "vmsnapshot.create.requested": 1,
    "vmsnapshot.created": 1,
    "vmsnapshot.failed": 1,
    "vmsnapshot.revert.requested": 1,
    "vmsnapshot.reverted": 1,
    "vmsnapshot.revert.failed": 1,
    "vmsnapshot.delete.requested": 1,
    "vmsnapshot.deleted": 1,
    "vmsnapshot.delete.failed": 1,
    # facts found by resync / crash recovery (moldd/app/hosts.py, moldd/daemon.py)
    "vm.reconciled": 1,
    "vm.stale_copy_destroyed": 1,
    "vm.job.crashed": 1,
    "vm.stale_definition_removed": 1,
    # HA decisions (moldd/ha), each with a cause
    "ha.restart.scheduled": 1,
    "ha.restart.started": 1,
    "ha.restart.succeeded": 1,
    "ha.restart.failed": 1,
    "ha.gave_up": 1,
    "ha.cancelled": 1,
    "ha.not_restarted": 1,
    "ha.waiting": 1,
    "ha.evacuation": 1,
    "ha.watcher_restarted": 1,
    "ha.fence_lied": 1,
    # hosts, groups, libvirt facts
    "host.registered": 1,
    "host.link": 1,
    "host.health": 1,
    "group.created": 1,
    "group.deleted": 1,
    "libvirt.domain_event": 1,
    # the log's own bookkeeping (events.snapshot): the digest of a read-model snapshot, bound to the chain
    "snapshot.sealed": 1,
    # users, API keys and refused calls (moldd/app/users.py, moldd/app/service.py)
    "user.created": 1,
    "user.keys.registered": 1,
    "user.revoked": 1,
    "access.denied": 1,
    # the management cluster (moldd/cluster.py): a node won the lead of the log with a new fencing epoch
    "daemon.leader_elected": 1,
}

EVENT_TYPES: Mapping[str, int] = MappingProxyType(_TYPES)
"""event type -> current schema version (read-only)."""


# CloudStack's event names (what the Mold/CloudStack manual's users look for), per moldd event type:
# (CloudStack type, state). A ``*.requested`` event is Scheduled, its success Completed, its failure Error.
_CLOUDSTACK_VERBS: dict[str, str] = {
    "vm.deploy": "VM.CREATE", "vm.start": "VM.START", "vm.stop": "VM.STOP", "vm.reboot": "VM.REBOOT",
    "vm.destroy": "VM.DESTROY", "vm.expunge": "VM.EXPUNGE", "vm.scale": "VM.SCALE", "vm.migrate": "VM.MIGRATE",
    "vm.restore": "VM.RESTORE", "vm.iso.attach": "ISO.ATTACH", "vm.iso.detach": "ISO.DETACH",
    "vm.volume.resize": "VOLUME.RESIZE", "vmsnapshot.create": "VMSNAPSHOT.CREATE",
    "vmsnapshot.revert": "VMSNAPSHOT.REVERTTO", "vmsnapshot.delete": "VMSNAPSHOT.DELETE",
}  # fmt: skip
_CLOUDSTACK_DONE: dict[str, tuple[str, str]] = {
    "vm.created": ("VM.CREATE", "Completed"), "vm.started": ("VM.START", "Completed"),
    "vm.stopped": ("VM.STOP", "Completed"), "vm.rebooted": ("VM.REBOOT", "Completed"),
    "vm.destroyed": ("VM.DESTROY", "Completed"), "vm.expunged": ("VM.EXPUNGE", "Completed"),
    "vm.recovered": ("VM.RECOVER", "Completed"), "vm.updated": ("VM.UPDATE", "Completed"),
    "vm.offering.changed": ("VM.UPGRADE", "Completed"), "vm.scaled": ("VM.SCALE", "Completed"),
    "vm.migrated": ("VM.MIGRATE", "Completed"), "vm.restored": ("VM.RESTORE", "Completed"),
    "vm.iso.attached": ("ISO.ATTACH", "Completed"), "vm.iso.detached": ("ISO.DETACH", "Completed"),
    "vm.volume.resized": ("VOLUME.RESIZE", "Completed"), "vmsnapshot.created": ("VMSNAPSHOT.CREATE", "Completed"),
    "vmsnapshot.reverted": ("VMSNAPSHOT.REVERTTO", "Completed"),
    "vmsnapshot.deleted": ("VMSNAPSHOT.DELETE", "Completed"), "vmsnapshot.failed": ("VMSNAPSHOT.CREATE", "Error"),
    "group.created": ("VM.GROUP.CREATE", "Completed"), "group.deleted": ("VM.GROUP.DELETE", "Completed"),
    "ha.restart.started": ("HA.VM.RESTART", "Started"), "ha.restart.succeeded": ("HA.VM.RESTART", "Completed"),
    "ha.restart.failed": ("HA.VM.RESTART", "Error"),
}  # fmt: skip


def cloudstack_event(event_type: str) -> tuple[str, str] | None:
    """CloudStack's (type, state) for a moldd event type, e.g. ``vm.start.requested`` → ("VM.START", "Scheduled");
    None for types CloudStack has no name for."""
    if event_type in _CLOUDSTACK_DONE:
        return _CLOUDSTACK_DONE[event_type]
    verb, _, phase = event_type.rpartition(".")
    name = _CLOUDSTACK_VERBS.get(verb)
    if name is None:
        return None
    return {"requested": (name, "Scheduled"), "failed": (name, "Error")}.get(phase)


def upcasters() -> Upcasters:
    """A registry declaring every known type; register upcasters for old schema versions here."""
    reg = Upcasters()
    reg.declare_many(EVENT_TYPES)
    return reg


__all__ = ["EVENT_TYPES", "cloudstack_event", "upcasters"]
