"""The fold on hand-made event sequences: rules that are hard to reach on real hosts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from events import StoredEvent
from moldd.projection.readmodel import ReadModel


class Log:
    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.versions: dict[str, int] = {}

    def add(
        self, stream: str, event_type: str, payload: dict[str, Any], correlation: str | None = None
    ) -> None:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        pos = len(self.events) + 1
        self.events.append(
            StoredEvent(
                pos,
                stream,
                version,
                event_type,
                1,
                datetime(2026, 1, 1, 0, 0, pos, tzinfo=UTC),
                "t",
                None,
                None,
                correlation,
                payload,
                b"",
                b"",
            )
        )

    def fold(self) -> ReadModel:
        return ReadModel().apply_all(self.events)


def deployed(host: str = "h1") -> Log:
    log = Log()
    log.add("vm-a", "vm.deploy.requested", {
        "name": "a", "id": 1, "internal_name": "i-2-1-VM", "display_name": "a", "hostname": "a", "host": host,
        "cluster": "c1", "ha_enabled": True, "offering": {"name": "small", "vcpus": 1, "memory_mib": 128},
    })  # fmt: skip
    log.add("vm-a", "vm.created", {"host": host, "root_disk": {"path": "/d/a.qcow2"}})
    log.add("vm-a", "vm.start.requested", {"host": host})
    log.add("vm-a", "vm.started", {"host": host})
    return log


def test_a_late_migration_failure_does_not_undo_an_ha_restart_elsewhere() -> None:
    log = deployed("h1")
    log.add("vm-a", "vm.migrate.requested", {"host": "h2"}, correlation="m1")
    # h1 dies mid-migration: fenced, the VM is recorded down, HA restarts it on h3 ...
    log.add(
        "vm-a",
        "vm.reconciled",
        {"state": "Stopped", "power_state": "off", "host": "h1", "stop_cause": "host-failed"},
    )
    log.add("vm-a", "ha.restart.started", {"host": "h3"})
    log.add("vm-a", "ha.restart.succeeded", {"host": "h3"})
    # ... and only then does the migration job report its failure on the source
    log.add("vm-a", "vm.migrate.failed", {"host": "h1", "state": "Stopped", "error": {"message": "source gone"},
                                          "job_status": "failed"}, correlation="m1")  # fmt: skip
    vm = log.fold().vms["a"]
    assert (vm.state, vm.host, vm.power_state) == ("Running", "h3", "on")
    assert vm.error == "source gone"


def test_a_migration_failure_in_time_returns_the_vm_to_its_source() -> None:
    log = deployed("h1")
    log.add("vm-a", "vm.migrate.requested", {"host": "h2"}, correlation="m1")
    log.add(
        "vm-a",
        "vm.migrate.failed",
        {"host": "h1", "error": {"message": "no route"}, "job_status": "failed"},
        correlation="m1",
    )
    vm = log.fold().vms["a"]
    assert (vm.state, vm.host) == ("Running", "h1")


def test_an_out_of_band_stop_marks_the_cause_and_a_copy_elsewhere_is_ignored() -> None:
    log = deployed("h1")
    log.add("vm-a", "libvirt.domain_event", {"host": "h2", "event": "STOPPED", "detail": "FAILED"})
    assert log.fold().vms["a"].state == "Running"  # a stale copy on another host stopped: not this VM
    log.add("vm-a", "libvirt.domain_event", {"host": "h1", "event": "STOPPED", "detail": "DESTROYED"})
    vm = log.fold().vms["a"]
    assert (vm.state, vm.stop_cause, vm.power_state) == ("Stopped", "destroyed", "off")


def test_folding_twice_or_from_a_snapshot_gives_the_same_model() -> None:
    log = deployed()
    full = log.fold()
    again = ReadModel.from_dict(full.to_dict()).apply_all(log.events)  # overlap is skipped by position
    assert again.to_dict() == full.to_dict()
