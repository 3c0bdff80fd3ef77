"""ReadModel.vms_listed: what listVirtualMachines pages through, in id order without sorting per request, and
never stale (a new VM, an expunged one, a model restored from a snapshot whose keys are sorted by name)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from events import StoredEvent
from events.canonical import canonical_json, loads
from moldd.projection.readmodel import ReadModel

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Log:
    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.versions: dict[str, int] = {}

    def add(self, stream: str, et: str, payload: dict[str, Any]) -> StoredEvent:
        self.versions[stream] = self.versions.get(stream, 0) + 1
        pos = len(self.events) + 1
        ev = StoredEvent(pos, stream, self.versions[stream], et, 1, T0 + timedelta(seconds=pos), "t", None, None,
                         None, payload, b"", b"")  # fmt: skip
        self.events.append(ev)
        return ev

    def deploy(self, name: str, vm_id: int) -> StoredEvent:
        return self.add(f"vm-{name}", "vm.deploy.requested", {
            "name": name, "id": vm_id, "internal_name": f"i-2-{vm_id}-VM", "display_name": name, "hostname": name,
            "host": "h1", "cluster": "c1", "offering": {"name": "small", "vcpus": 1, "memory_mib": 128},
        })  # fmt: skip


def ids(vms: list[Any]) -> list[int]:
    return [v.id for v in vms]


def test_in_id_order_without_expunged_and_never_stale() -> None:
    log = Log()
    names = ["zeta", "alpha", "mike", "bravo"]  # name order differs from id order
    for i, name in enumerate(names, start=1):
        log.deploy(name, i)
    model = ReadModel().apply_all(log.events)
    assert ids(model.vms_listed()) == [1, 2, 3, 4]
    model.apply(log.add("vm-mike", "vm.expunged", {}))
    assert ids(model.vms_listed()) == [1, 2, 4]
    assert ids(model.vms_listed(expunged=True)) == [1, 2, 3, 4]
    model.apply(log.deploy("echo", 5))
    assert ids(model.vms_listed()) == [1, 2, 4, 5]
    # restored from a snapshot: canonical JSON sorts the VMs by name; the list is still by id
    restored = ReadModel.from_dict(loads(canonical_json(model.to_dict())))
    assert list(restored.vms) != [v.name for v in model.vms_listed(expunged=True)]
    assert ids(restored.vms_listed()) == [1, 2, 4, 5]
    assert ids(restored.vms_listed(expunged=True)) == [1, 2, 3, 4, 5]


def test_a_redeployed_name_shows_the_new_vm_object() -> None:
    log = Log()
    log.deploy("a", 1)
    model = ReadModel().apply_all(log.events)
    first = model.vms_listed()[0]
    model.apply(log.deploy("a", 2))  # the same name again (a new VM object)
    assert model.vms_listed()[0] is model.vms["a"] and model.vms_listed()[0] is not first
