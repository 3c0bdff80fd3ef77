"""The parse and decide steps of the verbs split into parse → decide → act, each alone: no daemon, no host."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

from moldd.app.lifecycle import deploy_payload, parse_deploy
from moldd.app.operations import (
    EditRequest,
    MigrationKind,
    check_destination_room,
    check_edit_target,
    decide_edit,
    decide_migration,
    parse_edit,
)
from moldd.config import Config, parse_config
from moldd.domain.capacity import HostLoad
from moldd.domain.errors import CapacityError, Conflict, InvalidState, MolddError, NotFound, ValidationError
from moldd.domain.ha import RestartPolicy
from moldd.domain.ids import stable_uuid
from moldd.domain.states import VMState
from moldd.libvirt.host import MigrationPoll, migration_flags, migration_params, migration_poll_step
from moldd.projection.model import VM


def vm(**kw: Any) -> VM:
    base: dict[str, Any] = dict(
        name="vm-1", id=1, internal_name="i-1", display_name="one", hostname="one", state=VMState.STOPPED,
    )  # fmt: skip
    return VM(**(base | kw))


# -- updateVirtualMachine ----------------------------------------------------------------------------------
def test_edit_parses_every_field_into_vm_fields() -> None:
    req = parse_edit(
        {"id": "vm-1", "displayname": " Web ", "hostname": "Web-1", "group": "g", "haenable": "true",
         "hapolicy": "on-failure", "hapriority": "7", "ostype": "Debian", "description": "a\nb",
         "details": {"cpu_model": "host"}}
    )  # fmt: skip
    assert req.key == "vm-1" and req.hostname == "web-1" and req.details == {"cpu_model": "host"}
    assert req.changes == {
        "display_name": "Web", "group": "g", "ha_enabled": True, "ha_policy": "on-failure", "ha_priority": 7,
        "os_type": "Debian", "description": "a\nb",
    }  # fmt: skip


def test_edit_with_an_empty_group_clears_it() -> None:
    assert parse_edit({"id": "vm-1", "group": ""}).changes == {"group": None}
    assert parse_edit({"id": "vm-1", "group": None}).changes == {"group": None}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"id": "vm-1", "vmname": "x"}, "vmname"),
        ({"id": "vm-1", "hostname": "1bad"}, "hostname"),
        ({"id": "vm-1", "hostname": None}, "hostname"),
        ({"id": "vm-1", "displayname": ""}, "displayname"),
        ({"id": "vm-1", "group": "-bad"}, "group"),
        ({"id": "vm-1", "ha": "maybe"}, "ha"),
        ({"id": "vm-1", "hapolicy": "sometimes"}, "hapolicy"),
        ({"id": "vm-1", "hapriority": 101}, "hapriority"),
        ({"id": "vm-1", "details": "x"}, "details"),
        ({"id": "vm-1", "colour": "red"}, "colour"),
    ],
)
def test_edit_refusals_name_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_edit(args)
    assert exc.value.field == field


def test_edit_target_keeps_the_vm_name_and_needs_a_known_group() -> None:
    check_edit_target(vm(), parse_edit({"id": "vm-1", "name": "vm-1"}), groups=set())
    with pytest.raises(ValidationError) as exc:
        check_edit_target(vm(), parse_edit({"id": "vm-1", "name": "other"}), groups=set())
    assert exc.value.field == "name"
    with pytest.raises(ValidationError):
        check_edit_target(vm(), parse_edit({"id": "vm-1", "name": None}), groups=set())
    with pytest.raises(NotFound):
        check_edit_target(vm(), parse_edit({"id": "vm-1", "group": "g"}), groups={"h"})
    check_edit_target(vm(), parse_edit({"id": "vm-1", "group": "g"}), groups={"g"})
    assert parse_edit({"name": "vm-1"}).key == "vm-1"  # "name" alone names the VM


def test_edit_decides_only_what_changes() -> None:
    req = parse_edit({"id": "vm-1", "displayname": "one", "hostname": "two", "ostype": "Linux"})
    assert decide_edit(vm(), req, hostname_taken=False) == {"hostname": "two"}


def test_edit_refuses_a_taken_hostname_and_a_state_that_forbids_editing() -> None:
    with pytest.raises(Conflict):
        decide_edit(vm(), parse_edit({"id": "vm-1", "hostname": "two"}), hostname_taken=True)
    with pytest.raises(InvalidState):
        decide_edit(vm(state=VMState.EXPUNGING), parse_edit({"id": "vm-1", "ostype": "x"}), hostname_taken=False)


def test_edit_with_nothing_to_change_decides_nothing() -> None:
    assert decide_edit(vm(), EditRequest("vm-1", None, {}, None, None), hostname_taken=False) == {}


# -- deployVirtualMachine ----------------------------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    doc = {
        "daemon": {"socket": "run/moldd.sock", "database": "state/log.db", "storage_dir": "state/disks"},
        "hosts": [{"name": "h1", "uri": "test:///default", "cluster": "c1"}],
        "templates": [{"name": "tiny", "image": "images/t.qcow2", "os_type": "Alpine"}],
        "isos": [{"name": "boot", "path": "images/boot.iso"}],
        "offerings": [{"name": "small", "vcpus": 1, "memory_mib": 256}],
    }
    return parse_config(doc, tmp_path / "moldd.toml")


def test_deploy_parses_catalog_items_and_defaults(cfg: Config) -> None:
    req = parse_deploy(cfg, {"serviceofferingid": "small", "templateid": "tiny"})
    assert req.offering.name == "small" and req.template is not None and req.template.name == "tiny"
    assert req.iso is None and req.start and not req.ha and req.priority == 0
    assert req.os_type == "Alpine" and req.policy is RestartPolicy(cfg.ha.default_policy)
    by_id = parse_deploy(cfg, {"offering": stable_uuid("offering", "small"), "template": "tiny",
                               "hostid": stable_uuid("host", "h1")})  # fmt: skip
    assert by_id.offering.name == "small" and by_id.host == "h1"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"offering": "small"}, "template"),
        ({"offering": "small", "template": "tiny", "iso": "boot"}, "template"),
        ({"offering": "small", "iso": "boot"}, "rootdisksize"),
        ({"offering": "big", "template": "tiny"}, "offering"),
        ({"offering": "small", "template": "huge"}, "template"),
        ({"offering": "small", "template": "tiny", "hapriority": -1}, "hapriority"),
        ({"offering": "small", "template": "tiny", "name": "1-bad"}, "hostname"),
        ({"offering": "small", "template": "tiny", "hostid": str(uuid.uuid4())}, "host"),
    ],
)
def test_deploy_refusals_name_the_field(cfg: Config, args: dict[str, Any], field: str) -> None:
    with pytest.raises(MolddError) as exc:
        parse_deploy(cfg, args)
    assert exc.value.field == field


def test_deploy_payload_names_the_vm_after_its_generated_name_unless_told(cfg: Config) -> None:
    host = HostLoad(name="h1", cluster="c1", max_vms=10, vms=0, up=True)
    req = parse_deploy(cfg, {"offering": "small", "iso": "boot", "size": 2, "ha": True})
    payload = deploy_payload(cfg, req, name="vm-7", vm_id=7, vm_uuid="u", host=host, details={})
    assert payload["display_name"] == "vm-7" and payload["hostname"] == "vm-7"
    assert payload["template"] is None and payload["iso"] == "boot" and payload["root_disk"] == {"size_gb": 2}
    assert payload["host"] == "h1" and payload["cluster"] == "c1" and payload["ha_enabled"] is True
    named = parse_deploy(cfg, {"offering": "small", "template": "tiny", "displayname": "Web", "name": "web"})
    payload = deploy_payload(cfg, named, name="vm-8", vm_id=8, vm_uuid="u", host=host, details={"a": 1})
    assert payload["display_name"] == "Web" and payload["hostname"] == "web" and payload["details"] == {"a": 1}


# -- HostConnection.async_migrate ----------------------------------------------------------------------------
def test_migration_poll_steps() -> None:
    assert migration_poll_step(True, now=100.0, deadline=50.0, wants_progress=True) is MigrationPoll.FINISHED
    assert migration_poll_step(False, now=100.0, deadline=50.0, wants_progress=True) is MigrationPoll.TIMED_OUT
    assert migration_poll_step(False, now=10.0, deadline=50.0, wants_progress=True) is MigrationPoll.REPORT
    assert migration_poll_step(False, now=10.0, deadline=None, wants_progress=False) is MigrationPoll.WAIT
    assert migration_poll_step(False, now=1e9, deadline=None, wants_progress=True) is MigrationPoll.REPORT


def test_migration_flags_and_params() -> None:
    base = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    assert migration_flags(live=False, unsafe=False) == base
    both = migration_flags(live=True, unsafe=True)
    assert both == base | libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_UNSAFE
    assert migration_params(None, None) == {}
    assert migration_params("tcp://127.0.0.1:49152", 100) == {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1:49152", libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 100,
    }  # fmt: skip


# -- migrateVirtualMachine ------------------------------------------------------------------------------------
def test_migration_of_a_running_vm_is_live_and_of_a_stopped_one_offline(cfg: Config) -> None:
    h1 = cfg.hosts[0]
    assert decide_migration(vm(state=VMState.RUNNING, host="h0", cluster="c1"), h1) is MigrationKind.LIVE
    assert decide_migration(vm(state=VMState.STOPPED, host="h0", cluster="c1"), h1) is MigrationKind.OFFLINE
    assert decide_migration(vm(state=VMState.CREATED, host=None), h1) is MigrationKind.OFFLINE


@pytest.mark.parametrize(
    ("facts", "error", "field"),
    [
        ({"host": "h1"}, ValidationError, "host"),  # already there
        ({"cluster": "c2"}, ValidationError, "host"),  # another cluster
        ({"snapshots": {"s": {}}}, InvalidState, "id"),
        ({"state": VMState.STARTING}, InvalidState, None),
    ],
)
def test_migration_refusals(cfg: Config, facts: dict[str, Any], error: type[MolddError], field: str | None) -> None:
    with pytest.raises(error) as exc:
        decide_migration(vm(**({"state": VMState.RUNNING, "host": "h0", "cluster": "c1"} | facts)), cfg.hosts[0])
    if field is not None:
        assert exc.value.field == field


def test_migration_needs_an_up_destination_with_a_free_slot() -> None:
    check_destination_room(HostLoad(name="h1", cluster="c1", max_vms=2, vms=1, up=True))
    with pytest.raises(CapacityError, match="not up"):
        check_destination_room(HostLoad(name="h1", cluster="c1", max_vms=2, vms=0, up=False))
    with pytest.raises(CapacityError, match="full: 2 of 2"):
        check_destination_room(HostLoad(name="h1", cluster="c1", max_vms=2, vms=2, up=True))
