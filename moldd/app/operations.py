"""VM management beyond the lifecycle (CloudStack/Mold API names): edit, change offering, hot scale, resize the
root disk, migrate, reinstall, advanced settings, console, ISO attach/detach, and the capacity warning.

Handlers follow the lifecycle pattern: parse args (field errors) → lock the VM → domain check → append the
first event (the acknowledgement) → job → outcome event with ``job_status``. Jobs that work on a VM whose
state does not change meanwhile (resize of a stopped disk, ISO, reinstall, scale) keep the VM's lock until they
end, so a start or stop sent meanwhile waits and then re-checks, instead of racing the disk or the domain."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from events import NewEvent
from moldd.app.args import VM_ALIASES, Args
from moldd.app.bus import CommandReply
from moldd.app.lifecycle import async_power_off, async_start_on, err, hostname_taken
from moldd.app.placement import host_loads
from moldd.app.secrets import SecretStore, protect_details
from moldd.app.service import App, Command, verb
from moldd.app.settings_check import async_check_settings
from moldd.app.specs import console_log_path, domain_spec, root_disk_path
from moldd.config import HostConfig
from moldd.domain.capacity import HostLoad
from moldd.domain.errors import (
    CapacityError,
    Conflict,
    InvalidState,
    MolddError,
    NotFound,
    OperationFailed,
    ValidationError,
    present,
)
from moldd.domain.ha import parse_policy
from moldd.domain.names import validate_display_name, validate_group_name, validate_hostname
from moldd.domain.scaling import check_resize, check_scale
from moldd.domain.settings import validate_details
from moldd.domain.states import Action, VMState, check
from moldd.libvirt import storage
from moldd.libvirt.host import HostConnection
from moldd.libvirt.xml import build_domain_xml
from moldd.projection.model import VM

log = structlog.get_logger("moldd.operations")
GIB = 1024**3
OFFERING_ALIASES = {"serviceofferingid": "offering", "serviceoffering": "offering"}


# -- shared helpers --------------------------------------------------------------------------------------
def state_of(vm: VM) -> VMState:
    return VMState(vm.state)


def offering_named(app: App, name: str) -> dict[str, Any]:
    offering: dict[str, Any] = app.catalog("offering", name).model_dump()
    return offering


async def async_define_stopped(app: App, vm: VM) -> Any:
    """(Re)define a VM that is not running on its host from its current record, so operations that need the
    libvirt domain (cdrom, snapshots) find it with the current disk; returns the host connection."""
    conn = app.hosts.conn(vm.host)
    if await conn.async_domain_state(vm.internal_name) not in ("running", "paused", "blocked"):
        await conn.async_define(build_domain_xml(domain_spec(app.config, vm)))
    return conn


def disk_target(xml: str, *, device: str, source: str | None = None) -> str:
    """The target dev (``vda``, ``hdc``) of the domain's disk of kind ``device`` (and file ``source``)."""
    for disk in ET.fromstring(xml).findall("devices/disk"):
        if disk.get("device") != device:
            continue
        src, tgt = disk.find("source"), disk.find("target")
        if source is not None and (src is None or src.get("file") != source):
            continue
        if tgt is not None and tgt.get("dev"):
            return str(tgt.get("dev"))
    raise NotFound(f"the domain has no {device} {source or ''}".strip(), field="id")


def live_maxima(xml: str) -> tuple[int, int]:
    """(max vCPUs, max memory MiB) a running domain was started with."""
    root = ET.fromstring(xml)
    vcpu, mem = root.find("vcpu"), root.find("memory")
    if vcpu is None or mem is None or not vcpu.text or not mem.text:
        raise OperationFailed("the running domain's XML has no <vcpu> or <memory> value")
    unit = {"KiB": 1024, "MiB": 1024**2, "GiB": GIB, "b": 1, "bytes": 1}.get(mem.get("unit", "KiB"), 1024)
    return int(vcpu.text), int(mem.text) * unit // (1024**2)


# -- edit basic info and advanced settings ----------------------------------------------------------------
EDIT_ARGS = {
    "id", "name", "vmname", "displayname", "hostname", "group", "ha", "hapolicy", "hapriority", "ostype",
    "description", "details",
}  # fmt: skip
EDIT_ALIASES = {
    "virtualmachineid": "id", "vm": "id", "haenable": "ha", "groupid": "group", "ostypeid": "ostype",
}  # fmt: skip


def settings_event(
    vm: VM, details: dict[str, Any], cmd: Command, secrets: SecretStore | None = None
) -> NewEvent | None:
    changes = validate_details(details)
    if secrets is not None:
        changes = protect_details(secrets, changes)
    merged = dict(vm.details)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    if merged == vm.details:
        return None
    return NewEvent(
        "vm.settings.changed",
        {"changes": changes, "details": merged},
        actor=str(cmd.actor),
        causation_id=cmd.id,
        correlation_id=cmd.id,
    )


async def _async_live_description(app: App, name: str, text: str) -> None:
    """The domain's description is the display name: change it on the defined (and running) domain now, not only
    at the next start. Best effort: the log already holds the change, and the next definition carries it."""
    vm = app.model.vms[name]
    if vm.host is None or not app.hosts.is_connected(vm.host):
        return
    try:
        await app.hosts.conn(vm.host).async_set_description(vm.internal_name, text)
    except MolddError as exc:
        log.warning("description_not_applied", vm=name, reason=exc.message)


NOT_GIVEN: Any = object()


@dataclass(frozen=True)
class EditRequest:
    """An ``updateVirtualMachine`` request, parsed: every value validated, nothing checked against the VM yet."""

    key: Any  # the VM, as the client named it
    rename_to: Any  # "name" given beside "id": refused unless it is the VM's own name (NOT_GIVEN: absent)
    changes: dict[str, Any]  # VM field -> new value (hostname aside: it is checked against the other VMs)
    hostname: str | None
    details: dict[str, Any] | None  # advanced settings to change


def parse_edit(raw: Mapping[str, Any]) -> EditRequest:
    """Parse: the args of ``updateVirtualMachine``; a refusal names the field."""
    a = Args(raw, EDIT_ARGS, EDIT_ALIASES)
    if "vmname" in a:
        raise ValidationError(
            "the VM name (ID) is immutable; change displayname or hostname instead", field="vmname"
        )
    changes: dict[str, Any] = {}
    fields: list[tuple[str, str, Callable[[Any], Any]]] = [
        ("displayname", "display_name", validate_display_name),
        ("hostname", "hostname", validate_hostname),
        ("group", "group", lambda g: None if g in (None, "") else validate_group_name(g)),
        ("ha", "ha_enabled", lambda _: a.boolean("ha")),
        ("hapolicy", "ha_policy", lambda p: str(parse_policy(p))),
        ("hapriority", "ha_priority", lambda _: a.integer("hapriority", min=0, max=100)),
        ("ostype", "os_type", lambda _: a.text("ostype", max_len=64)),
        ("description", "description", lambda _: a.text("description", max_len=1024, multiline=True)),
    ]
    for arg, field_name, parse in fields:
        if arg in a:
            changes[field_name] = parse(a.raw(arg))
    hostname = changes.pop("hostname", None)
    return EditRequest(
        key=a.raw("id") if "id" in a else a.raw("name"),
        rename_to=a.raw("name") if "id" in a and "name" in a else NOT_GIVEN,
        changes=changes,
        hostname=hostname,
        details=a.mapping("details") if "details" in a else None,
    )


def check_edit_target(vm: VM, req: EditRequest, groups: Container[str]) -> None:
    """Decide, before the VM's lock: what the request names must exist and the VM name stays as it is."""
    if req.rename_to is not NOT_GIVEN and req.rename_to != vm.name:
        raise ValidationError(
            f"the VM name {vm.name!r} is immutable (asked to rename it to {req.rename_to!r}); "
            "change displayname or hostname instead",
            field="name",
        )
    group = req.changes.get("group")
    if group is not None and group not in groups:
        raise NotFound(f"no VM group {group!r}: create it with createInstanceGroup", field="group")


def decide_edit(vm: VM, req: EditRequest, *, hostname_taken: bool) -> dict[str, Any]:
    """Decide, under the VM's lock: the fields that change (VM field -> new value); raises to refuse."""
    if req.changes or req.hostname is not None:
        check(state_of(vm), Action.EDIT)
    if req.details is not None:
        check(state_of(vm), Action.SETTINGS)
    changes = dict(req.changes)
    if req.hostname is not None:
        if hostname_taken:
            raise Conflict(f"hostname {req.hostname!r} is already used by another VM", field="hostname")
        changes["hostname"] = req.hostname
    return {k: v for k, v in changes.items() if getattr(vm, k) != v}


@verb("updateVirtualMachine")
async def update_vm(app: App, cmd: Command) -> CommandReply:
    req = parse_edit(cmd.args)
    vm = app.get_vm({"id": req.key})
    check_edit_target(vm, req, app.model.groups)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        async with app.placement_lock:  # hostnames are unique: check and record under one lock
            taken = req.hostname is not None and hostname_taken(app, req.hostname, except_vm=vm.name)
            changed = decide_edit(vm, req, hostname_taken=taken)
            events = []
            if changed:
                events.append(
                    NewEvent(
                        "vm.updated",
                        {"changes": changed},
                        actor=str(cmd.actor),
                        causation_id=cmd.id,
                        correlation_id=cmd.id,
                    )
                )
            settings = settings_event(vm, req.details, cmd, app.secrets) if req.details is not None else None
            if settings is not None:
                await async_check_settings(
                    app, settings.payload["details"], template=vm.template, cluster=vm.cluster
                )
                events.append(settings)
            if not events:
                return CommandReply(result={"vm": vm.to_dict(), "changed": {}}, position=app.model.position)
            res = await app.async_append(
                f"vm-{vm.name}", events, expected_version=vm.version, command_id=cmd.id
            )
    log.info("vm_updated", vm=vm.name, changed=sorted(changed), settings=settings is not None)
    if "display_name" in changed:
        await _async_live_description(app, vm.name, changed["display_name"])
    result = {"vm": app.model.vms[vm.name].to_dict(), "changed": changed}
    if settings is not None:
        result["details_changed"] = settings.payload["changes"]
    return CommandReply(result=result, position=res.last_position)


@verb("updateVirtualMachineSettings")
async def update_settings(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "details"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    details = a.mapping("details")
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.SETTINGS)
        ev = settings_event(vm, details, cmd, app.secrets)
        if ev is None:
            return CommandReply(
                result={"vm": vm.to_dict(), "details_changed": {}}, position=app.model.position
            )
        warnings = await async_check_settings(app, ev.payload["details"], template=vm.template, cluster=vm.cluster)
        res = await app.async_append(f"vm-{vm.name}", [ev], expected_version=vm.version, command_id=cmd.id)
    result: dict[str, Any] = {"vm": app.model.vms[vm.name].to_dict(), "details_changed": ev.payload["changes"]}
    if warnings:
        result["warnings"] = warnings
    return CommandReply(result=result, position=res.last_position)


# -- change service offering (stopped) and hot scale-up (running) --------------------------------------
@verb("changeServiceForVirtualMachine")
async def change_offering(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "offering"}, VM_ALIASES | OFFERING_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    new = offering_named(app, a.text("offering"))
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.CHANGE_OFFERING)
        if vm.offering.get("name") == new["name"]:
            raise ValidationError(f"the VM already uses offering {new['name']!r}", field="offering")
        res = await app.async_record(
            vm,
            "vm.offering.changed",
            {"offering": new, "previous": vm.offering, "applies": "at next start"},
            cmd=cmd,
            first=True,
        )
    return CommandReply(result={"vm": app.model.vms[vm.name].to_dict()}, position=res.last_position)


@verb("scaleVirtualMachine")
async def scale_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "offering"}, VM_ALIASES | OFFERING_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    new = offering_named(app, a.text("offering"))
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.SCALE)
        conn = app.hosts.conn(vm.host)
        max_vcpus, max_mem = live_maxima(await conn.async_get_xml(vm.internal_name))
        plan = check_scale(vm.offering, new, max_vcpus=max_vcpus, max_memory_mib=max_mem)
        res = await app.async_record(
            vm,
            "vm.scale.requested",
            {"offering": new["name"], "vcpus": plan.vcpus, "memory_mib": plan.memory_mib,
             "max_vcpus": max_vcpus, "max_memory_mib": max_mem},
            cmd=cmd,
            first=True,
        )  # fmt: skip
        claim.keep_for_job(cmd.id, _async_scale_job(app, vm.name, new, plan.vcpus, plan.memory_mib, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_scale_job(
    app: App, name: str, new: dict[str, Any], vcpus: int | None, memory_mib: int | None, cmd: Command
) -> None:
    vm = app.model.vms[name]
    applied: dict[str, Any] = {}
    try:
        conn = app.hosts.conn(vm.host)
        if vcpus is not None:
            await conn.async_set_vcpus(vm.internal_name, vcpus)  # vCPU hot-plug, live and in the config
            applied["vcpus"] = vcpus
        if memory_mib is not None:
            # No DIMM hot-plug: the domain was started with <memory> = the offering's maximum, and this moves
            # the virtio-balloon target up to it. A guest without a balloon driver sees the maximum all along.
            await conn.async_set_memory(vm.internal_name, memory_mib)
            applied["memory_mib"] = memory_mib
            applied["memory_reported_mib"] = await _async_settled_memory(conn, vm.internal_name, memory_mib)
    except MolddError as exc:
        await app.async_record(
            name, "vm.scale.failed", {"error": err(exc), "applied": applied, "job_status": "failed"}, cmd=cmd
        )
        return
    await app.async_record(
        name,
        "vm.scaled",
        {"offering": new, "applied": applied, "memory_method": "balloon" if memory_mib else None,
         "job_status": "succeeded", "result": {"offering": new["name"], **applied, **_memory_note(applied)}},
        cmd=cmd,
    )  # fmt: skip


async def _async_settled_memory(conn: HostConnection, domain: str, target_mib: int, wait_s: float = 5.0) -> int:
    """What QEMU reports for the guest once its balloon driver has moved to the target (it takes a moment), or
    after ``wait_s`` (a guest without the driver never moves: the caller reports that)."""
    seen = 0
    for _ in range(int(wait_s / 0.25)):
        live = ET.fromstring(await conn.async_get_xml(domain))
        seen = int(live.findtext("currentMemory") or 0) // 1024
        if seen == target_mib:
            break
        await asyncio.sleep(0.25)
    return seen


def _memory_note(applied: dict[str, Any]) -> dict[str, Any]:
    target, seen = applied.get("memory_mib"), applied.get("memory_reported_mib")
    if target is None or seen == target:
        return {}
    return {
        "memory_note": f"balloon target set to {target} MiB; QEMU reports {seen} MiB for the guest (a guest "
        "without a virtio-balloon driver has the offering's maximum from boot and ignores the target)"
    }


# -- resize the root disk --------------------------------------------------------------------------------
@verb("resizeVolume")
async def resize_volume(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "size", "shrinkok"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    size = a.integer("size", min=1, max=4096)
    shrink_ok = a.boolean("shrinkok", False)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.RESIZE)
        current = float(vm.root_disk.get("size_gb") or 0)
        shrink = check_resize(current, size, shrink_ok=shrink_ok, snapshots=len(vm.snapshots))
        if shrink:
            check(state_of(vm), Action.SHRINK)
        if not vm.root_disk.get("path"):
            raise InvalidState("the VM has no root disk yet", field="id")
        res = await app.async_record(
            vm,
            "vm.volume.resize.requested",
            {"old_size_gb": current, "new_size_gb": size, "shrink": shrink},
            cmd=cmd,
            first=True,
        )
        claim.keep_for_job(cmd.id, _async_resize_job(app, vm.name, size, shrink, current, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_resize_job(
    app: App, name: str, size_gb: int, shrink: bool, old: float, cmd: Command
) -> None:
    vm = app.model.vms[name]
    path = Path(vm.root_disk["path"])
    live = vm.state == VMState.RUNNING
    try:
        if live:
            conn = app.hosts.conn(vm.host)
            target = disk_target(await conn.async_get_xml(vm.internal_name), device="disk", source=str(path))
            await conn.async_block_resize(vm.internal_name, target, size_gb * GIB)  # QEMU block_resize
        else:
            await storage.async_resize(path, size_gb * GIB, shrink=shrink)  # qemu-img resize
        info = await storage.async_info(path)
    except MolddError as exc:
        await app.async_record(
            name, "vm.volume.resize.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    new = round(info.virtual_size / GIB, 3)
    await app.async_record(
        name,
        "vm.volume.resized",
        {"old_size_gb": old, "new_size_gb": new, "live": live, "job_status": "succeeded",
         "result": {"size_gb": new}},
        cmd=cmd,
    )  # fmt: skip


# -- migrate ---------------------------------------------------------------------------------------------
PROGRESS_EVERY_S = 1.0


class MigrationKind(StrEnum):
    LIVE = "live"  # a running VM: libvirt copies it over while it runs
    OFFLINE = "offline"  # a stopped VM: forgotten on the old host, defined on the new one at its next start

    def __str__(self) -> str:
        return self.value


def decide_migration(vm: VM, dest: HostConfig) -> MigrationKind:
    """Decide, under the VM's lock: whether ``vm`` may move to ``dest`` and how; raises to refuse."""
    state = state_of(vm)
    live = state is VMState.RUNNING
    check(state, Action.MIGRATE if live or state not in (VMState.STOPPED, VMState.CREATED) else Action.MOVE)
    if dest.name == vm.host:
        raise ValidationError(f"the VM is already on host {dest.name!r}", field="host")
    if vm.cluster is not None and dest.cluster != vm.cluster:
        raise ValidationError(
            f"host {dest.name!r} is in cluster {dest.cluster!r} and the VM in {vm.cluster!r}: "
            "a VM migrates only within its cluster",
            field="host",
        )
    if vm.snapshots:
        raise InvalidState(
            f"the VM has {len(vm.snapshots)} VM snapshot(s), which libvirt cannot move with it: delete them first",
            field="id",
        )
    return MigrationKind.LIVE if live else MigrationKind.OFFLINE


def check_destination_room(load: HostLoad) -> None:
    """Decide, under the placement lock: the destination is up and has a free slot."""
    if not load.up:
        raise CapacityError(f"host {load.name!r} is not up", field="host")
    if load.vms >= load.max_vms:
        raise CapacityError(f"host {load.name!r} is full: {load.vms} of {load.max_vms} VMs", field="host")


@verb("migrateVirtualMachine")
async def migrate_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "host"}, VM_ALIASES | {"hostid": "host"})
    vm = app.get_vm({"id": a.raw("id")})
    dest = app.catalog("host", a.text("host"))  # a name or its stable id
    in_flight = app.migrations  # destinations of running migrations: two at once cannot take a host's last slot
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        kind = decide_migration(vm, dest)
        async with app.placement_lock:
            loads = host_loads(app.config, app.model, ignore_vm=vm.name, reserved=in_flight)
            check_destination_room(next(h for h in loads if h.name == dest.name))
            if kind is MigrationKind.LIVE:
                app.hosts.conn(dest.name)  # Unavailable unless connected
                app.hosts.conn(vm.host)
            res = await app.async_record(
                vm,
                "vm.migrate.requested",
                {"from": vm.host, "host": dest.name, "cluster": dest.cluster, "live": kind is MigrationKind.LIVE},
                cmd=cmd,
                first=True,
            )
            in_flight[vm.name] = dest.name
    job = (
        _async_live_migrate(app, vm.name, dest.name, cmd)
        if kind is MigrationKind.LIVE
        else _async_move(app, vm.name, dest.name, cmd)
    )

    async def run() -> None:
        try:
            await job
        finally:
            in_flight.pop(vm.name, None)

    app.spawn_job(cmd.id, vm.name, run())
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_live_migrate(app: App, name: str, dest: str, cmd: Command) -> None:
    vm = app.model.vms[name]
    source = present(vm.host, f"host of {name}")
    loop = asyncio.get_running_loop()
    records: list[asyncio.Future[Any]] = []
    last = [-PROGRESS_EVERY_S]

    def on_progress(progress: dict[str, Any]) -> None:
        now = loop.time()
        if progress.get("type") != "completed" and now - last[0] < PROGRESS_EVERY_S:
            return  # at most one progress event a second
        last[0] = now
        records.append(
            asyncio.ensure_future(
                app.async_record(name, "vm.migrate.progress", {"progress": progress}, cmd=cmd)
            )
        )

    try:
        src, dst = app.hosts.conn(source), app.hosts.conn(dest)
        uri = (app.config.host(dest) or app.config.hosts[0]).migration_uri
        # unsafe: the disks are files on storage every host of the cluster sees at the same path; libvirt
        # cannot prove that for a local file system and would refuse otherwise.
        await src.async_migrate(vm.internal_name, dst, uri, progress=on_progress, unsafe=True, timeout=600.0)
    except MolddError as exc:
        await asyncio.gather(*records, return_exceptions=True)
        domain_state = None
        try:
            domain_state = await app.hosts.conn(source).async_domain_state(vm.internal_name)
        except MolddError:
            pass
        state = str(VMState.RUNNING) if domain_state in ("running", "paused", "blocked") else None
        await app.async_record(
            name,
            "vm.migrate.failed",
            {"host": source, "to": dest, "domain_state": domain_state, "state": state, "error": err(exc),
             "job_status": "failed"},
            cmd=cmd,
        )  # fmt: skip
        return
    await asyncio.gather(*records, return_exceptions=True)
    await app.async_record(
        name,
        "vm.migrated",
        {"host": dest, "from": source, "live": True, "job_status": "succeeded", "result": {"host": dest}},
        cmd=cmd,
    )


async def _async_move(app: App, name: str, dest: str, cmd: Command) -> None:
    """Offline move of a stopped VM: forget it on the old host; the next start defines it on the new one."""
    vm = app.model.vms[name]
    undefined: bool | None = None
    if vm.host is not None and app.hosts.is_connected(vm.host):
        try:
            await app.hosts.conn(vm.host).async_undefine(vm.internal_name)
            undefined = True
        except MolddError as exc:
            log.warning("move_undefine_failed", vm=name, host=vm.host, reason=exc.message)
            undefined = False
    await app.async_record(
        name,
        "vm.migrated",
        {"host": dest, "from": vm.host, "offline": True, "undefined_on_source": undefined,
         "job_status": "succeeded", "result": {"host": dest}},
        cmd=cmd,
    )  # fmt: skip


# -- reinstall / change OS -------------------------------------------------------------------------------
@verb("restoreVirtualMachine")
async def restore_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "template"}, VM_ALIASES | {"templateid": "template"})
    vm = app.get_vm({"id": a.raw("id")})
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.RESTORE)
        if vm.snapshots:
            raise InvalidState(
                f"cannot reinstall a VM that has {len(vm.snapshots)} VM snapshot(s): delete them first",
                field="id",
            )
        template_name = a.text("template", None) or vm.template
        if template_name is None:
            raise ValidationError(
                "the VM was created from an ISO and has no template: give the template to install",
                field="template",
            )
        template_name = app.catalog("template", template_name).name  # a name or its stable id
        running = vm.state == VMState.RUNNING
        res = await app.async_record(
            vm,
            "vm.restore.requested",
            {"template": template_name, "previous_template": vm.template, "restart": running},
            cmd=cmd,
            first=True,
        )
        claim.keep_for_job(cmd.id, _async_restore_job(app, vm.name, template_name, running, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


def _next_root(app: App, vm: VM) -> Path:
    stem = Path(vm.root_disk.get("path") or "root.qcow2").stem  # root, root-1, root-2 ...
    generation = int(stem.rsplit("-", 1)[1]) + 1 if "-" in stem and stem.rsplit("-", 1)[1].isdigit() else 1
    return root_disk_path(app.config, vm.name, generation)


async def _async_restore_job(app: App, name: str, template_name: str, running: bool, cmd: Command) -> None:
    template = present(app.config.template(template_name), f"template {template_name}")
    vm = app.model.vms[name]
    old = Path(vm.root_disk["path"]) if vm.root_disk.get("path") else None
    new = _next_root(app, vm)
    try:
        if running:
            # as a stop: ACPI first, forced off only after the stop timeout (the guest may have unsaved state)
            await app.async_record(
                name, "vm.stop.requested", {"forced": False, "host": vm.host, "for": "restore"}, cmd=cmd
            )
            how = await async_power_off(app, vm, forced=False)
            await app.async_record(name, "vm.stopped", {**how, "for": "restore"}, cmd=cmd)
        size = (await storage.async_info(template.image)).virtual_size
        if old is not None and old.exists():
            size = max(size, (await storage.async_info(old)).virtual_size)
        new.parent.mkdir(parents=True, exist_ok=True)
        await storage.async_create_overlay(template.image, new, size)
        info = await storage.async_info(new)
    except MolddError as exc:
        await storage.async_delete(new)
        await app.async_record(
            name, "vm.restore.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    root = {"path": str(new), "size_gb": round(info.virtual_size / GIB, 3)}
    done = {} if running else {"job_status": "succeeded", "result": {"root_disk": root}}
    await app.async_record(
        name,
        "vm.restored",
        {"template": template_name, "root_disk": root, "os_type": template.os_type,
         "previous_root_disk": str(old) if old else None, **done},
        cmd=cmd,
    )  # fmt: skip
    if old is not None and old != new:
        await storage.async_delete(old)
    vm = app.model.vms[name]
    if running:
        host = present(vm.host, f"host of {name}")
        await app.async_record(name, "vm.start.requested", {"host": host, "cluster": vm.cluster}, cmd=cmd)
        await async_start_on(app, name, host, cmd=cmd)
    elif vm.host is not None and app.hosts.is_connected(vm.host):
        try:  # the old definition points at the deleted disk
            await async_define_stopped(app, vm)
        except MolddError as exc:
            log.warning("restore_redefine_failed", vm=name, reason=exc.message)


# -- console ---------------------------------------------------------------------------------------------
@verb("getVirtualMachineConsole")
async def console(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    check(state_of(vm), Action.CONSOLE)
    info = await app.hosts.conn(vm.host).async_console_info(vm.internal_name)
    vnc = info.get("vnc")
    serial = info.get("serial") or {}
    result = {
        "vm": vm.name,
        "host": vm.host,
        "vnc": None
        if vnc is None
        else {
            "host": vnc.get("listen") or "127.0.0.1",
            "port": vnc.get("port"),
            "password": vnc.get("password"),
        },
        "serial": {
            "pty": serial.get("pty"),
            "log": serial.get("log") or str(console_log_path(app.config, vm.name)),
        },
    }
    # who opened a VM's console is what an auditor asks: a fact in the log (it changes no state)
    res = await app.async_record(
        vm, "vm.console.opened", {"host": vm.host, "vnc": vnc is not None, "serial": bool(serial.get("pty"))},
        cmd=cmd,
    )  # fmt: skip
    return CommandReply(result=result, position=res.last_position)


# -- ISO attach / detach ---------------------------------------------------------------------------------
@verb("attachIso")
async def attach_iso(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "iso"}, VM_ALIASES | {"isoid": "iso"})
    vm = app.get_vm({"id": a.raw("id")})
    iso = app.catalog("iso", a.text("iso"))  # a name or its stable id
    iso_name = iso.name
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.ATTACH_ISO)
        if vm.iso is not None:
            raise Conflict(f"the VM already has ISO {vm.iso!r} attached: detach it first", field="iso")
        res = await app.async_record(vm, "vm.iso.attach.requested", {"iso": iso_name}, cmd=cmd, first=True)
        claim.keep_for_job(cmd.id, _async_cdrom_job(app, vm.name, iso_name, iso.path, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


@verb("detachIso")
async def detach_iso(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.DETACH_ISO)
        if vm.iso is None:
            raise InvalidState("the VM has no ISO attached", field="iso")
        res = await app.async_record(vm, "vm.iso.detach.requested", {"iso": vm.iso}, cmd=cmd, first=True)
        claim.keep_for_job(cmd.id, _async_cdrom_job(app, vm.name, None, None, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


def cdrom_source(xml: str) -> str | None:
    for disk in ET.fromstring(xml).findall("devices/disk"):
        if disk.get("device") == "cdrom":
            src = disk.find("source")
            return None if src is None else src.get("file")
    return None


async def _async_verify_cdrom(conn: HostConnection, domain: str, want: str | None, live: bool) -> None:
    """A guest that holds the tray (just booted, or locked it) can make QEMU accept the change and apply it a
    moment later, or not at all: report what libvirt shows, not what we asked for."""
    seen = 0
    for _ in range(25):
        if cdrom_source(await conn.async_get_xml(domain, inactive=not live)) == want:
            seen += 1
            if seen == 2 or not live:  # live: it must also hold a moment later
                return
        else:
            seen = 0
        await asyncio.sleep(0.3)
    raise OperationFailed(
        f"the cdrom of {domain} still shows {cdrom_source(await conn.async_get_xml(domain))!r} after the change "
        "(the guest may hold the tray locked)",
        field="iso",
    )


async def _async_cdrom_job(
    app: App, name: str, iso_name: str | None, path: Path | None, cmd: Command
) -> None:
    vm = app.model.vms[name]
    live = vm.state == VMState.RUNNING
    try:
        conn = app.hosts.conn(vm.host) if live else await async_define_stopped(app, vm)
        target = disk_target(await conn.async_get_xml(vm.internal_name), device="cdrom")
        await conn.async_attach_cdrom(vm.internal_name, path, target)
        await _async_verify_cdrom(conn, vm.internal_name, None if path is None else str(path), live)
    except MolddError as exc:
        fail = "vm.iso.attach.failed" if iso_name else "vm.iso.detach.failed"
        await app.async_record(name, fail, {"error": err(exc), "job_status": "failed"}, cmd=cmd)
        return
    if iso_name is not None:
        await app.async_record(
            name, "vm.iso.attached", {"iso": iso_name, "live": live, "job_status": "succeeded"}, cmd=cmd
        )
    else:
        await app.async_record(
            name, "vm.iso.detached", {"iso": vm.iso, "live": live, "job_status": "succeeded"}, cmd=cmd
        )
