"""Every event type of ``moldd/eventtypes.py`` is folded: a handler, or a declaration that it changes no state.
Whichever, an event appended to a VM's stream moves the VM's projected version to the stream's (a type the fold did
not know used to leave the VM behind its stream, so every later command answered 409 "kept changing" for ever)."""

from __future__ import annotations

import orjson
import pytest

from moldd.domain.states import VMState
from moldd.eventtypes import EVENT_TYPES
from moldd.projection.model import VM
from moldd.projection.readmodel import _HANDLERS, STATE_NEUTRAL, ReadModel
from tests.projection.test_readmodel import deployed


def test_every_event_type_has_a_handler_or_is_declared_state_neutral() -> None:
    missing = sorted(t for t in EVENT_TYPES if t not in _HANDLERS and t not in STATE_NEUTRAL)
    assert not missing, f"event types the fold neither handles nor declares state-neutral: {missing}"
    both = sorted(t for t in STATE_NEUTRAL if t in _HANDLERS)
    assert not both, f"declared state-neutral but handled: {both}"
    unknown = sorted(t for t in STATE_NEUTRAL if t not in EVENT_TYPES)
    assert not unknown, f"declared state-neutral but not in moldd/eventtypes.py: {unknown}"


# payloads that satisfy the handlers that read required keys
_PAYLOADS: dict[str, dict[str, object]] = {
    "vm.reconciled": {"state": "Running", "host": "h1"},
    "vm.offering.changed": {"offering": {"name": "small"}},
    "vm.scaled": {"offering": {"name": "small"}},
    "vm.settings.changed": {"details": {}},
    "vm.volume.resized": {"new_size_gb": 2},
    "vm.migrated": {"host": "h1"},
    "vm.restored": {"template": "tiny", "root_disk": {}},
    "vmsnapshot.create.requested": {"id": "s1", "name": "s1"},
    "vmsnapshot.created": {"id": "s1"},
    "vmsnapshot.failed": {"id": "s1"},
    "vmsnapshot.reverted": {"id": "s1", "state": "Running"},
    "vmsnapshot.delete.requested": {"id": "s1"},
    "vmsnapshot.deleted": {"id": "s1"},
    "user.created": {"name": "u1", "id": "0", "role": "readonly", "apikey": "k", "key_fingerprint": "f"},
    "user.keys.registered": {"name": "u1", "apikey": "k2", "key_fingerprint": "f2"},
    "user.revoked": {"name": "u1"},
    "host.registered": {"name": "h1", "uri": "x", "cluster": "c1", "max_vms": 4},
    "host.link": {"kind": "connected"},
    "host.health": {"to": "Up"},
    "group.created": {"name": "g"},
    "group.deleted": {"name": "g"},
}


@pytest.mark.parametrize("event_type", sorted(t for t in EVENT_TYPES if t != "vm.deploy.requested"))
def test_any_event_on_a_vm_stream_advances_the_vm_version(event_type: str) -> None:
    log = deployed()
    log.add("vm-a", event_type, dict(_PAYLOADS.get(event_type, {})))
    model = log.fold()
    assert model.vms["a"].version == log.versions["vm-a"], event_type
    assert model.vms["a"].position == len(log.events)


def test_states_restored_from_a_snapshot_are_enums() -> None:
    log = deployed()
    log.add("vm-a", "vm.stop.requested", {})  # Stopping, with prior_state Running
    model = log.fold()
    snap = orjson.loads(orjson.dumps(model.to_dict(), default=str))
    restored = ReadModel.from_dict(snap)
    vm = restored.vms["a"]
    assert type(vm.state) is VMState and vm.state is VMState.STOPPING
    assert type(vm.prior_state) is VMState and vm.prior_state is VMState.RUNNING
    assert type(VM.from_dict(snap["vms"]["a"]).state) is VMState


def test_reconciled_state_is_an_enum_and_error_carries_its_reason() -> None:
    log = deployed()
    log.add("vm-a", "vm.reconciled", {"state": "Error", "reason": "the deploy was interrupted"})
    vm = log.fold().vms["a"]
    assert type(vm.state) is VMState and vm.state is VMState.ERROR
    assert vm.error == "the deploy was interrupted"
