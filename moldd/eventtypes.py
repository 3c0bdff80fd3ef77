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
    # hosts, groups, libvirt facts
    "host.registered": 1,
    "host.link": 1,
    "host.health": 1,
    "group.created": 1,
    "group.deleted": 1,
    "libvirt.domain_event": 1,
    # the management cluster (moldd/cluster.py): a node won the lead of the log with a new fencing epoch
    "daemon.leader_elected": 1,
}

EVENT_TYPES: Mapping[str, int] = MappingProxyType(_TYPES)
"""event type -> current schema version (read-only)."""


def upcasters() -> Upcasters:
    """A registry declaring every known type; register upcasters for old schema versions here."""
    reg = Upcasters()
    reg.declare_many(EVENT_TYPES)
    return reg


__all__ = ["EVENT_TYPES", "upcasters"]
