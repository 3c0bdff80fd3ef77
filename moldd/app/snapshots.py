"""VM snapshots (CloudStack/Mold API names): createVMSnapshot, listVMSnapshots, revertToVMSnapshot,
deleteVMSnapshot. Internal qcow2 snapshots through libvirt: disk-only of a stopped VM, or with memory of a
running one. The tree (parent links, the current snapshot) is kept in the read model as libvirt keeps it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog

from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.lifecycle import err
from moldd.app.operations import async_define_stopped, state_of
from moldd.app.service import App, Command, verb
from moldd.domain.errors import Conflict, MolddError, NotFound, ValidationError
from moldd.domain.states import Action, VMState, check
from moldd.domain.vmsnapshots import check_create, revert_state, validate_snapshot_name
from moldd.projection.model import VM

log = structlog.get_logger("moldd.snapshots")
SNAP_ALIASES = {"virtualmachineid": "id", "vm": "id"}


def snapshot_view(vm: VM, snap: dict[str, Any]) -> dict[str, Any]:
    parent = vm.snapshots.get(snap.get("parent") or "")
    return {
        **snap,
        "vmsnapshotid": snap["id"],
        "virtualmachineid": vm.name,
        "parent_name": parent["name"] if parent else None,
        "current": vm.current_snapshot == snap["id"],
        "type": "DiskAndMemory" if snap.get("memory") else "Disk",
    }


def find_snapshot(app: App, a: Args) -> tuple[VM, dict[str, Any]]:
    """By ``vmsnapshotid`` alone, or by the VM (``id``) and the snapshot ``name``."""
    if "vmsnapshotid" in a:
        sid = a.text("vmsnapshotid")
        for vm in app.model.vms.values():
            if sid in vm.snapshots and vm.state != VMState.EXPUNGED:
                if "id" in a and app.get_vm({"id": a.raw("id")}).name != vm.name:
                    raise ValidationError(f"snapshot {sid!r} belongs to VM {vm.name!r}", field="vmsnapshotid")
                return vm, vm.snapshots[sid]
        raise NotFound(f"no VM snapshot {sid!r}", field="vmsnapshotid")
    if "id" not in a or "name" not in a:
        raise ValidationError("give vmsnapshotid, or the VM (id) and the snapshot name", field="vmsnapshotid")
    vm = app.get_vm({"id": a.raw("id")})
    name = a.text("name")
    for snap in vm.snapshots.values():
        if snap["name"] == name:
            return vm, snap
    raise NotFound(f"VM {vm.name} has no snapshot {name!r}", field="name")


# -- create ----------------------------------------------------------------------------------------------
@verb("createVMSnapshot")
async def create_snapshot(app: App, cmd: Command) -> CommandReply:
    a = Args(
        cmd.args,
        {"id", "name", "description", "snapshotmemory"},
        SNAP_ALIASES | {"snapshot": "name", "displayname": "name", "memory": "snapshotmemory"},
    )
    vm = app.get_vm({"id": a.raw("id")})
    memory = a.boolean("snapshotmemory", False)
    description = a.text("description", "", max_len=1024, multiline=True)
    name = validate_snapshot_name(a.raw("name")) if "name" in a else None
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check_create(state_of(vm), memory=memory, count=len(vm.snapshots), limit=app.config.max_vm_snapshots)
        if name is None:
            name = f"{vm.name}_snap_{datetime.now(UTC):%Y%m%d%H%M%S}"
            taken = {s["name"] for s in vm.snapshots.values()}
            base, n = name, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
        if any(s["name"] == name for s in vm.snapshots.values()):
            raise Conflict(f"VM {vm.name} already has a snapshot named {name!r}", field="name")
        sid = uuid.uuid4().hex
        payload = {"id": sid, "name": name, "description": description, "memory": memory,
                   "parent": vm.current_snapshot}  # fmt: skip
        res = await app.async_record(vm, "vmsnapshot.create.requested", payload, cmd=cmd, first=True)
        claim.keep_for_job(cmd.id, _async_create_job(app, vm.name, sid, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_create_job(app: App, name: str, sid: str, cmd: Command) -> None:
    vm = app.model.vms[name]
    snap = vm.snapshots[sid]
    try:
        conn = app.hosts.conn(vm.host) if vm.state == VMState.RUNNING else await async_define_stopped(app, vm)
        await conn.async_snapshot_create(vm.internal_name, snap["name"], snap["memory"], snap["description"])
    except MolddError as exc:
        await app.async_record(
            name, "vmsnapshot.failed", {"id": sid, "error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    await app.async_record(
        name,
        "vmsnapshot.created",
        {
            "id": sid,
            "name": snap["name"],
            "job_status": "succeeded",
            "result": {"vmsnapshotid": sid, "name": snap["name"]},
        },
        cmd=cmd,
    )


# -- list ------------------------------------------------------------------------------------------------
@verb("listVMSnapshots")
async def list_snapshots(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "vmsnapshotid", "name"}, SNAP_ALIASES | {"snapshot": "name"})
    sid, name = a.text("vmsnapshotid", None), a.text("name", None)
    if "id" in a:
        vms = [app.get_vm({"id": a.raw("id")})]
    else:
        vms = [v for v in app.model.vms.values() if v.state != VMState.EXPUNGED]
    rows = [
        snapshot_view(vm, snap)
        for vm in sorted(vms, key=lambda v: v.id)
        for snap in sorted(vm.snapshots.values(), key=lambda s: (s.get("created_at") or "", s["name"]))
        if (sid is None or snap["id"] == sid) and (name is None or snap["name"] == name)
    ]
    return CommandReply(result={"count": len(rows), "vmSnapshot": rows}, position=app.model.position)


# -- revert ----------------------------------------------------------------------------------------------
@verb("revertToVMSnapshot")
async def revert_snapshot(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "vmsnapshotid", "name"}, SNAP_ALIASES | {"snapshot": "name"})
    vm, snap = find_snapshot(app, a)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        snap = vm.snapshots.get(snap["id"]) or snap
        if snap.get("state") != "Ready":
            raise Conflict(
                f"snapshot {snap['name']!r} is {snap.get('state')}, not Ready", field="vmsnapshotid"
            )
        to = revert_state(state_of(vm), memory=bool(snap.get("memory")))
        res = await app.async_record(
            vm,
            "vmsnapshot.revert.requested",
            {"id": snap["id"], "name": snap["name"], "memory": bool(snap.get("memory")), "to_state": str(to)},
            cmd=cmd,
            first=True,
        )
        claim.keep_for_job(cmd.id, _async_revert_job(app, vm.name, snap["id"], to, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_revert_job(app: App, name: str, sid: str, to: VMState, cmd: Command) -> None:
    vm = app.model.vms[name]
    snap = vm.snapshots[sid]
    try:
        conn = app.hosts.conn(vm.host)
        await conn.async_snapshot_revert(vm.internal_name, snap["name"])
        domain_state = await conn.async_domain_state(vm.internal_name)
    except MolddError as exc:
        await app.async_record(
            name, "vmsnapshot.revert.failed", {"id": sid, "error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    state = str(to)
    if to is VMState.RUNNING and domain_state not in ("running", "paused", "blocked"):
        state = str(VMState.STOPPED)  # record what libvirt shows, not what we hoped for
    await app.async_record(
        name,
        "vmsnapshot.reverted",
        {"id": sid, "name": snap["name"], "state": state, "domain_state": domain_state,
         "job_status": "succeeded", "result": {"vmsnapshotid": sid, "state": state}},
        cmd=cmd,
    )  # fmt: skip


# -- delete ----------------------------------------------------------------------------------------------
@verb("deleteVMSnapshot")
async def delete_snapshot(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "vmsnapshotid", "name"}, SNAP_ALIASES | {"snapshot": "name"})
    vm, snap = find_snapshot(app, a)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(state_of(vm), Action.DELETE_SNAPSHOT)
        snap = vm.snapshots.get(snap["id"]) or snap
        if snap.get("state") not in ("Ready", "Error"):
            raise Conflict(f"snapshot {snap['name']!r} is {snap.get('state')}", field="vmsnapshotid")
        res = await app.async_record(
            vm, "vmsnapshot.delete.requested", {"id": snap["id"], "name": snap["name"]}, cmd=cmd, first=True
        )
        claim.keep_for_job(cmd.id, _async_delete_job(app, vm.name, snap["id"], cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_delete_job(app: App, name: str, sid: str, cmd: Command) -> None:
    vm = app.model.vms[name]
    snap = vm.snapshots[sid]
    try:
        conn = app.hosts.conn(vm.host)
        await conn.async_snapshot_delete(vm.internal_name, snap["name"])
    except MolddError as exc:
        await app.async_record(
            name, "vmsnapshot.delete.failed", {"id": sid, "error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    await app.async_record(
        name, "vmsnapshot.deleted", {"id": sid, "name": snap["name"], "job_status": "succeeded"}, cmd=cmd
    )
