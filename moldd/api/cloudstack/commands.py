"""The CloudStack commands moldd answers: each translates CloudStack parameters into a moldd verb's arguments
and moldd's reply into CloudStack's response. No business rule lives here; every change goes through the bus.

Parameters arrive as strings with lower-cased names. Parameters CloudStack knows but moldd has no use for
(``networkids``, ``keypair``, ``account``, ...) are ignored, as CloudStack ignores parameters it does not know.
"""

from __future__ import annotations

import importlib.metadata
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moldd.api.cloudstack import shapes
from moldd.api.cloudstack.errors import (
    CS_INVALID_PARAMETER,
    CS_PERMISSION_DENIED,
    PARAM_ERROR,
    UNSUPPORTED_ACTION_ERROR,
    CloudStackError,
    job_error,
)
from moldd.app.bus import Actor, CommandBus
from moldd.domain.ids import is_uuid, stable_uuid
from moldd.domain.roles import Role, required_role

MAX_PAGE_SIZE = 10000


@dataclass
class Call:
    """One CloudStack request being answered."""

    bus: CommandBus
    actor: Actor
    command: str  # as the client spelled it
    params: dict[str, str]  # lower-cased names

    async def dispatch(self, verb: str, args: Mapping[str, Any], *, job: bool = False) -> Any:
        # A job id is a UUID, as CloudStack clients expect (moldd's job id is the command id).
        command_id = str(uuid.uuid4()) if job else None
        reply = await self.bus.async_dispatch(verb, {k: v for k, v in args.items() if v is not None},
                                              command_id, self.actor)  # fmt: skip
        return reply.result

    def get(self, name: str) -> str | None:
        value = self.params.get(name)
        return value if value not in (None, "") else None

    def need(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise CloudStackError(
                PARAM_ERROR,
                f"Unable to execute API command {self.command.lower()} due to missing parameter {name}",
                CS_INVALID_PARAMETER,
            )
        return value

    def map(self, name: str) -> dict[str, str] | None:
        """``details[0].key=value`` (or ``details[0].key=k&details[0].value=v``) as one mapping."""
        out: dict[str, str] = {}
        pattern = re.compile(rf"^{re.escape(name)}\[(\d+)\]\.(.+)$")
        pairs: dict[str, dict[str, str]] = {}
        for key, value in self.params.items():
            m = pattern.match(key)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = value
        for entry in pairs.values():
            if set(entry) == {"key", "value"}:
                out[entry["key"]] = entry["value"]
            else:
                out.update(entry)
        return out or None


def bad_value(call: Call, name: str, value: str) -> CloudStackError:
    return CloudStackError(
        PARAM_ERROR,
        f"Unable to execute API command {call.command.lower()} due to invalid value. Invalid parameter {name} "
        f"value={value[:80]} due to incorrect long value format, or entity does not exist",
        CS_INVALID_PARAMETER,
    )


# -- id resolution: a CloudStack id (UUID) or a moldd name ----------------------------------------------
async def _by_id(call: Call, list_verb: str, key: str, kind: str, name: str) -> str | None:
    """The moldd name behind parameter ``name``: a name as given, a UUID looked up in ``list_verb``'s items;
    None when the parameter is absent."""
    value = call.get(name)
    if value is None or not is_uuid(value):
        return value
    items = (await call.dispatch(list_verb, {}))[key]
    for item in items:
        item_name = item["name"]
        if item.get("id") == value or stable_uuid(kind, item_name) == value:
            return str(item_name)
    raise bad_value(call, name, value)


async def resolve_offering(call: Call, name: str) -> str | None:
    return await _by_id(call, "listServiceOfferings", "serviceoffering", "offering", name)


async def resolve_host(call: Call, name: str) -> str | None:
    return await _by_id(call, "listHosts", "host", "host", name)


async def resolve_group(call: Call, name: str) -> str | None:
    return await _by_id(call, "listInstanceGroups", "instancegroup", "group", name)


async def resolve_image(call: Call, name: str) -> tuple[str, str] | None:
    """A template id (or an ISO id: CloudStack deploys from an ISO with ``templateid``) → (kind, name)."""
    value = call.get(name)
    if value is None:
        return None
    templates = (await call.dispatch("listTemplates", {}))["template"]
    isos = (await call.dispatch("listIsos", {}))["iso"]
    for kind, items in (("template", templates), ("iso", isos)):
        for item in items:
            if value in (item["id"], item["name"]):
                return kind, item["name"]
    raise bad_value(call, name, value)


async def resolve_iso(call: Call, name: str) -> str | None:
    return await _by_id(call, "listIsos", "iso", "iso", name)


async def resolve_ostype(call: Call, name: str) -> str | None:
    return await _by_id(call, "listOsTypes", "ostype", "ostype", name)


async def resolve_zone(call: Call) -> str | None:
    """``zoneid`` → the cluster it is (a zone per cluster)."""
    value = call.get("zoneid")
    if value is None:
        return None
    for z in (await call.dispatch("listZones", {}))["zone"]:
        if value in (z["id"], z["name"]):
            return str(z["name"])
    raise bad_value(call, "zoneid", value)


async def vm_view(call: Call, key: str) -> dict[str, Any]:
    return dict((await call.dispatch("listVirtualMachines", {"id": key, "listall": True}))["virtualmachine"][0])


async def vm_of_volume(call: Call, value: str) -> dict[str, Any]:
    """A root volume id → its VM (moldd has one volume per VM; a VM id or name is taken too)."""
    for vm in (await call.dispatch("listVirtualMachines", {}))["virtualmachine"]:
        if value in (stable_uuid("volume", shapes.vm_uuid(vm)), shapes.vm_uuid(vm), vm["name"]):
            return dict(vm)
    raise bad_value(call, "id", value)


# -- replies ---------------------------------------------------------------------------------------------
def paged(call: Call, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    pagesize, page = call.get("pagesize"), call.get("page")
    if pagesize is not None:
        size = _int(call, "pagesize", pagesize, 1, MAX_PAGE_SIZE)
        number = _int(call, "page", page, 1, 2**31) if page is not None else 1
        shown = items[(number - 1) * size : number * size]
    else:
        shown = items
    return {"count": len(items), key: shown}


def _int(call: Call, name: str, value: str, low: int, high: int) -> int:
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise CloudStackError(
            PARAM_ERROR, f"Unable to execute API command {call.command.lower()}: {name} must be an integer "
            f"from {low} to {high}, not {value[:40]!r}", CS_INVALID_PARAMETER,
        )  # fmt: skip
    return int(value)


def _keyword(call: Call, item: dict[str, Any], *fields: str) -> bool:
    keyword = call.get("keyword")
    if keyword is None:
        return True
    return any(keyword.lower() in str(item.get(f) or "").lower() for f in fields)


def _match(call: Call, item: dict[str, Any], param: str, field: str) -> bool:
    value = call.get(param)
    return value is None or str(item.get(field)) == value


def async_reply(result: dict[str, Any], *, with_id: bool = False) -> dict[str, Any]:
    job = result["job"]
    out = {"jobid": job["id"]}
    if with_id and result.get("vm"):
        out["id"] = shapes.vm_uuid(result["vm"])
    return out


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Spec:
    name: str  # CloudStack's spelling
    handler: Handler
    is_async: bool
    verb: str  # the moldd verb whose role rule applies (for listApis)
    description: str


COMMANDS: dict[str, Spec] = {}


def command(name: str, *, is_async: bool = False, verb: str | None = None, description: str = "") -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name.lower()] = Spec(name, fn, is_async, verb or name, description or (fn.__doc__ or "").strip())
        return fn

    return register


# -- VMs -------------------------------------------------------------------------------------------------
@command("listVirtualMachines", description="Lists VMs (id, name, state, groupid, hostid, zoneid, keyword, paging).")
async def list_vms(call: Call) -> dict[str, Any]:
    args: dict[str, Any] = {"keyword": call.get("keyword")}
    state = call.get("state")
    if state is not None and state not in _VM_STATES:
        raise bad_value(call, "state", state)
    if call.get("id"):
        args["id"] = call.get("id")
    group, host = await resolve_group(call, "groupid"), await resolve_host(call, "hostid")
    args |= {"group": group, "host": host}
    vms = (await call.dispatch("listVirtualMachines", args))["virtualmachine"]
    name, zone = call.get("name"), call.get("zoneid")
    out = [shapes.virtual_machine(v) for v in vms if name is None or name in (v["hostname"], v["name"])]
    if zone is not None:
        out = [v for v in out if zone in (v.get("zoneid"), v.get("zonename"))]
    if state is not None:
        out = [v for v in out if state in (v["state"], v["moldstate"])]
    return paged(call, "virtualmachine", out)


_VM_STATES = {"Starting", "Running", "Stopping", "Stopped", "Destroyed", "Expunging", "Migrating", "Error",
              "Unknown", "Created", "Creating", "Destroying", "Expunged"}  # fmt: skip


@command("deployVirtualMachine", is_async=True, description="Creates a VM from a template (or an ISO) and starts it.")
async def deploy(call: Call) -> dict[str, Any]:
    cluster = await resolve_zone(call)
    image = await resolve_image(call, "templateid")
    if image is None:
        call.need("templateid")
    kind, image_name = image or ("template", "")
    size = call.get("rootdisksize") or call.get("size")
    args = {
        "offering": await resolve_offering(call, "serviceofferingid") or call.need("serviceofferingid"),
        kind: image_name,
        "hostname": call.get("name"),
        "displayname": call.get("displayname"),
        "group": call.get("group"),
        "host": await resolve_host(call, "hostid"),
        "rootdisksize": size,
        "startvm": call.get("startvm"),
        "details": call.map("details"),
        "ha": call.get("haenable"),
        "ostype": await resolve_ostype(call, "ostypeid"),
        "cluster": cluster,
    }
    return async_reply(await call.dispatch("deployVirtualMachine", args, job=True), with_id=True)


def _vm_command(name: str, verb: str, *, extra: Callable[[Call], Awaitable[dict[str, Any]]] | None = None,
                key: str = "id", description: str = "") -> None:  # fmt: skip
    async def handler(call: Call) -> dict[str, Any]:
        args: dict[str, Any] = {"id": call.need(key)}
        if extra is not None:
            args |= await extra(call)
        return async_reply(await call.dispatch(verb, args, job=True), with_id=True)

    handler.params_from = (key, extra)  # type: ignore[attr-defined]  # for listApis
    command(name, is_async=True, verb=verb, description=description)(handler)


_PARAM_USE = re.compile(r"""(?:call\.(need|get|map)|resolve_\w+)\((?:call, )?"([a-z0-9_.\[\]]+)"\)(\s*or call\.need)?""")
_MATCHED = re.compile(r'_match\(call, \w+, "([a-z0-9_]+)"')
_INDEXED = re.compile(r"""call\.params\["([a-z0-9_]+)"\]""")
# Parameters read inside shared helpers, by the call that gives them away in a translator's source.
_HELPER_PARAMS = {
    "paged(call": ("page", "pagesize"), "_keyword(call": ("keyword",), "resolve_zone(call)": ("zoneid",),
    "_images(call": ("id", "name", "keyword", "zoneid"), "_user_name(call)": ("id", "username"),
}  # fmt: skip
_PARAMS_CACHE: dict[str, list[dict[str, Any]]] = {}


def api_params(spec: Spec) -> list[dict[str, Any]]:
    """The parameters a command reads, from its translator's source (what ``listApis`` shows CloudMonkey)."""
    cached = _PARAMS_CACHE.get(spec.name)
    if cached is not None:
        return cached
    import inspect

    sources = [spec.handler]
    key, extra = getattr(spec.handler, "params_from", (None, None))
    if extra is not None:
        sources.append(extra)
    found: dict[str, bool] = {}
    if key is not None:
        found[key] = True
    for fn in sources:
        try:
            text = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        for how, name, or_need in _PARAM_USE.findall(text):
            found[name] = found.get(name, False) or how == "need" or bool(or_need)
        for name in _MATCHED.findall(text) + _INDEXED.findall(text):
            found.setdefault(name, False)
        for marker, names in _HELPER_PARAMS.items():
            if marker in text:
                for name in names:
                    found.setdefault(name, False)
    params = [{"name": n, "required": r, "type": "string", "description": ""} for n, r in sorted(found.items())]
    _PARAMS_CACHE[spec.name] = params
    return params


async def _host_arg(call: Call) -> dict[str, Any]:
    return {"host": await resolve_host(call, "hostid")}


async def _forced(call: Call) -> dict[str, Any]:
    return {"forced": call.get("forced")}


async def _expunge(call: Call) -> dict[str, Any]:
    return {"expunge": call.get("expunge")}


async def _template(call: Call) -> dict[str, Any]:
    image = await resolve_image(call, "templateid")
    return {"template": image[1]} if image else {}


async def _offering(call: Call) -> dict[str, Any]:
    return {"offering": await resolve_offering(call, "serviceofferingid") or call.need("serviceofferingid")}


_vm_command("startVirtualMachine", "startVirtualMachine", extra=_host_arg, description="Starts a VM.")
_vm_command("stopVirtualMachine", "stopVirtualMachine", extra=_forced, description="Stops a VM.")
_vm_command("rebootVirtualMachine", "rebootVirtualMachine", extra=_forced, description="Reboots a VM.")
_vm_command("destroyVirtualMachine", "destroyVirtualMachine", extra=_expunge, description="Destroys a VM.")
_vm_command("expungeVirtualMachine", "expungeVirtualMachine", description="Expunges a destroyed VM.")
_vm_command("restoreVirtualMachine", "restoreVirtualMachine", extra=_template, key="virtualmachineid",
            description="Reinstalls a VM from its template.")  # fmt: skip
_vm_command("scaleVirtualMachine", "scaleVirtualMachine", extra=_offering, description="Scales a VM.")
_vm_command("detachIso", "detachIso", key="virtualmachineid", description="Detaches the ISO of a VM.")


@command("migrateVirtualMachine", is_async=True, description="Live-migrates a VM to another host.")
async def migrate(call: Call) -> dict[str, Any]:
    args = {"id": call.need("virtualmachineid"), "host": await resolve_host(call, "hostid") or call.need("hostid")}
    return async_reply(await call.dispatch("migrateVirtualMachine", args, job=True), with_id=True)


@command("attachIso", is_async=True, description="Attaches an ISO to a VM.")
async def attach_iso(call: Call) -> dict[str, Any]:
    args = {"id": call.need("virtualmachineid"), "iso": await resolve_iso(call, "id") or call.need("id")}
    return async_reply(await call.dispatch("attachIso", args, job=True), with_id=True)


@command("recoverVirtualMachine", description="Recovers a destroyed VM.")
async def recover(call: Call) -> dict[str, Any]:
    result = await call.dispatch("recoverVirtualMachine", {"id": call.need("id")})
    return {"virtualmachine": shapes.virtual_machine(result["vm"])}


@command("updateVirtualMachine", description="Updates a VM: name (the hostname), displayname, group, haenable, ostypeid, details.")
async def update_vm(call: Call) -> dict[str, Any]:
    args: dict[str, Any] = {
        "id": call.need("id"),
        # CloudStack's "name" is the VM's hostname; moldd's VM name is immutable.
        "hostname": call.get("name"),
        "displayname": call.get("displayname"),
        "ha": call.get("haenable"),
        "ostype": await resolve_ostype(call, "ostypeid"),
        "details": call.map("details"),
    }
    if "group" in call.params:
        args["group"] = call.params["group"]  # "" takes the VM out of its group
    result = await call.dispatch("updateVirtualMachine", args)
    return {"virtualmachine": shapes.virtual_machine(result["vm"])}


@command("changeServiceForVirtualMachine", description="Changes the service offering of a stopped VM.")
async def change_service(call: Call) -> dict[str, Any]:
    args = {"id": call.need("id")} | await _offering(call)
    result = await call.dispatch("changeServiceForVirtualMachine", args)
    return {"virtualmachine": shapes.virtual_machine(result["vm"])}


# -- volumes (one root volume per VM) ----------------------------------------------------------------------
@command("listVolumes", verb="listVirtualMachines", description="Lists VM root volumes (id, virtualmachineid, type, keyword).")
async def list_volumes(call: Call) -> dict[str, Any]:
    vms = (await call.dispatch("listVirtualMachines", {}))["virtualmachine"]
    out = [shapes.volume(v) for v in vms]
    vm_id = call.get("virtualmachineid")
    out = [
        v for v in out
        if _match(call, v, "id", "id") and (vm_id is None or vm_id == v["virtualmachineid"])
        and _match(call, v, "type", "type") and _keyword(call, v, "name", "vmname")
    ]  # fmt: skip
    return paged(call, "volume", out)


@command("resizeVolume", is_async=True, description="Resizes a VM's root volume (size in GiB).")
async def resize_volume(call: Call) -> dict[str, Any]:
    vm = await vm_of_volume(call, call.need("id"))
    args = {"id": vm["name"], "size": call.need("size"), "shrinkok": call.get("shrinkok")}
    return async_reply(await call.dispatch("resizeVolume", args, job=True))


# -- VM snapshots ----------------------------------------------------------------------------------------
async def _snapshots(call: Call, vm_key: str | None) -> list[dict[str, Any]]:
    args = {"id": vm_key} if vm_key else {}
    rows = (await call.dispatch("listVMSnapshots", args))["vmSnapshot"]
    vms = {v["name"]: v for v in (await call.dispatch("listVirtualMachines", {}))["virtualmachine"]}
    return [shapes.vm_snapshot(r, vms.get(r["virtualmachineid"])) for r in rows]


async def list_vm_snapshots(call: Call) -> dict[str, Any]:
    out = await _snapshots(call, call.get("virtualmachineid"))
    out = [
        s for s in out
        if _match(call, s, "vmsnapshotid", "id") and _match(call, s, "name", "name") and _keyword(call, s, "name")
    ]  # fmt: skip
    return paged(call, "vmSnapshot", out)


command("listVMSnapshot", description="Lists VM snapshots.")(list_vm_snapshots)
command("listVMSnapshots", verb="listVMSnapshots", description="Lists VM snapshots.")(list_vm_snapshots)


@command("createVMSnapshot", is_async=True, description="Snapshots a VM (snapshotmemory for a live memory snapshot).")
async def create_snapshot(call: Call) -> dict[str, Any]:
    args = {
        "id": call.need("virtualmachineid"),
        "name": call.get("name") or call.get("displayname"),
        "description": call.get("description"),
        "snapshotmemory": call.get("snapshotmemory"),
    }
    return async_reply(await call.dispatch("createVMSnapshot", args, job=True))


@command("revertToVMSnapshot", is_async=True, description="Reverts a VM to a snapshot.")
async def revert_snapshot(call: Call) -> dict[str, Any]:
    args = {"vmsnapshotid": shapes.snapshot_key(call.need("vmsnapshotid"))}
    return async_reply(await call.dispatch("revertToVMSnapshot", args, job=True))


@command("deleteVMSnapshot", is_async=True, description="Deletes a VM snapshot.")
async def delete_snapshot(call: Call) -> dict[str, Any]:
    args = {"vmsnapshotid": shapes.snapshot_key(call.need("vmsnapshotid"))}
    return async_reply(await call.dispatch("deleteVMSnapshot", args, job=True))


# -- groups ----------------------------------------------------------------------------------------------
@command("createInstanceGroup", description="Creates a VM group.")
async def create_group(call: Call) -> dict[str, Any]:
    result = await call.dispatch("createInstanceGroup", {"name": call.need("name")})
    return {"instancegroup": shapes.instance_group(result["group"])}


@command("listInstanceGroups", description="Lists VM groups (id, name, keyword).")
async def list_groups(call: Call) -> dict[str, Any]:
    groups = [shapes.instance_group(g) for g in (await call.dispatch("listInstanceGroups", {}))["instancegroup"]]
    groups = [g for g in groups if _match(call, g, "id", "id") and _match(call, g, "name", "name") and _keyword(call, g, "name")]
    return paged(call, "instancegroup", groups)


@command("deleteInstanceGroup", description="Deletes a VM group; its VMs leave the group.")
async def delete_group(call: Call) -> dict[str, Any]:
    name = await resolve_group(call, "id") or call.need("id")
    await call.dispatch("deleteInstanceGroup", {"name": name, "ungroup": True})
    return {"success": True}


# -- jobs ------------------------------------------------------------------------------------------------
_JOB_STATUS = {"pending": 0, "running": 0, "succeeded": 1, "failed": 2}
# A job's ``command`` is the prefix of the event that started it (``vm.start`` for vm.start.requested).
_PKG = "org.apache.cloudstack.api.command"
_CMD_CLASS = {
    "vm.deploy": f"{_PKG}.user.vm.DeployVMCmd",
    "vm.start": f"{_PKG}.user.vm.StartVMCmd",
    "vm.stop": f"{_PKG}.user.vm.StopVMCmd",
    "vm.reboot": f"{_PKG}.user.vm.RebootVMCmd",
    "vm.destroy": f"{_PKG}.user.vm.DestroyVMCmd",
    "vm.expunge": f"{_PKG}.admin.vm.ExpungeVMCmd",
    "vm.migrate": f"{_PKG}.admin.vm.MigrateVMCmd",
    "vm.restore": f"{_PKG}.user.vm.RestoreVMCmd",
    "vm.scale": f"{_PKG}.user.vm.ScaleVMCmd",
    "vm.iso.attach": f"{_PKG}.user.iso.AttachIsoCmd",
    "vm.iso.detach": f"{_PKG}.user.iso.DetachIsoCmd",
    "vm.volume.resize": f"{_PKG}.user.volume.ResizeVolumeCmd",
    "vmsnapshot.create": f"{_PKG}.user.vmsnapshot.CreateVMSnapshotCmd",
    "vmsnapshot.revert": f"{_PKG}.user.vmsnapshot.RevertToVMSnapshotCmd",
    "vmsnapshot.delete": f"{_PKG}.user.vmsnapshot.DeleteVMSnapshotCmd",
}
_SUCCESS_ONLY = {"vm.expunge", "vmsnapshot.delete"}


async def job_response(call: Call, job: dict[str, Any]) -> dict[str, Any]:
    status = _JOB_STATUS.get(job.get("status") or "", 0)
    verb = job.get("command") or ""
    vm: dict[str, Any] | None = None
    if job.get("vm"):
        found = (await call.dispatch("listVirtualMachines", {"id": job["vm"], "listall": True}))["virtualmachine"]
        vm = dict(found[0]) if found else None
    out: dict[str, Any] = {
        "jobid": job["id"],
        "cmd": _CMD_CLASS.get(verb, f"{_PKG}.moldd.{verb}"),
        "jobstatus": status,
        "jobprocstatus": 0,
        "jobresultcode": 530 if status == 2 else 0,
        "jobresulttype": "object",
        "created": shapes.cs_time(job.get("created_at")),
        "accountid": stable_uuid("account", shapes.ACCOUNT),
        "userid": stable_uuid("user", call.actor.user or "root"),
    }
    if vm is not None:
        out |= {"jobinstancetype": "VirtualMachine", "jobinstanceid": shapes.vm_uuid(vm)}
    if status == 2:
        out["jobresult"] = job_error(job.get("error"))
    elif status == 1:
        out["completed"] = shapes.cs_time(job.get("finished_at"))
        out["jobresult"] = await _job_result(call, verb, job, vm)
    return {k: v for k, v in out.items() if v is not None}


async def _job_result(call: Call, verb: str, job: dict[str, Any], vm: dict[str, Any] | None) -> dict[str, Any]:
    if verb in _SUCCESS_ONLY or vm is None:
        return {"success": True}
    if verb == "vm.volume.resize":
        return {"volume": shapes.volume(vm)}
    if verb == "vmsnapshot.create":
        sid = (job.get("result") or {}).get("vmsnapshotid")
        rows = (await call.dispatch("listVMSnapshots", {"vmsnapshotid": sid}))["vmSnapshot"] if sid else []
        if rows:
            return {"vmsnapshot": shapes.vm_snapshot(rows[0], vm)}
        return {"success": True}
    return {"virtualmachine": shapes.virtual_machine(vm)}


@command("queryAsyncJobResult", description="The state of an asynchronous job (jobstatus 0 pending, 1 done, 2 failed).")
async def query_job(call: Call) -> dict[str, Any]:
    job = (await call.dispatch("queryAsyncJobResult", {"jobid": call.need("jobid")}))["job"]
    return await job_response(call, job)


@command("listAsyncJobs", description="Lists recent jobs.")
async def list_jobs(call: Call) -> dict[str, Any]:
    jobs = (await call.dispatch("listAsyncJobs", {"limit": 10000}))["job"]
    return paged(call, "asyncjobs", [await job_response(call, j) for j in jobs])


# -- what the cluster offers -------------------------------------------------------------------------------
async def _zones(call: Call) -> list[dict[str, Any]]:
    return list((await call.dispatch("listZones", {}))["zone"])


@command("listZones", description="Lists zones: one per cluster of the configuration.")
async def list_zones(call: Call) -> dict[str, Any]:
    zones = [shapes.zone(z) for z in await _zones(call)]
    zones = [z for z in zones if _match(call, z, "id", "id") and _match(call, z, "name", "name")]
    return paged(call, "zone", zones)


_TEMPLATE_FILTERS = {"featured", "self", "selfexecutable", "sharedexecutable", "executable", "community", "all"}


async def _images(call: Call, verb: str, key: str, *, iso: bool) -> list[dict[str, Any]]:
    zones = await _zones(call)
    zone = call.get("zoneid")
    if zone is not None:
        zones = [z for z in zones if zone in (z["id"], z["name"])]
    out = [row for t in (await call.dispatch(verb, {}))[key] for row in shapes.template(t, zones, iso=iso)]
    return [
        t for t in out
        if _match(call, t, "id", "id") and _match(call, t, "name", "name") and _keyword(call, t, "name")
    ]  # fmt: skip


@command("listTemplates", description="Lists templates (templatefilter is required, as in CloudStack).")
async def list_templates(call: Call) -> dict[str, Any]:
    flt = call.need("templatefilter")
    if flt.lower() not in _TEMPLATE_FILTERS:
        raise bad_value(call, "templatefilter", flt)
    return paged(call, "template", await _images(call, "listTemplates", "template", iso=False))


@command("listIsos", description="Lists ISOs.")
async def list_isos(call: Call) -> dict[str, Any]:
    return paged(call, "iso", await _images(call, "listIsos", "iso", iso=True))


@command("listServiceOfferings", description="Lists service offerings.")
async def list_offerings(call: Call) -> dict[str, Any]:
    items = [shapes.service_offering(o) for o in (await call.dispatch("listServiceOfferings", {}))["serviceoffering"]]
    items = [o for o in items if _match(call, o, "id", "id") and _match(call, o, "name", "name") and _keyword(call, o, "name")]
    return paged(call, "serviceoffering", items)


@command("listOsTypes", description="Lists OS types.")
async def list_os_types(call: Call) -> dict[str, Any]:
    items = [shapes.os_type(o) for o in (await call.dispatch("listOsTypes", {}))["ostype"]]
    items = [o for o in items if _match(call, o, "id", "id") and _match(call, o, "description", "description")]
    return paged(call, "ostype", items)


@command("listHosts", description="Lists hosts (id, name, zoneid, clusterid, state).")
async def list_hosts(call: Call) -> dict[str, Any]:
    items = [shapes.host(h) for h in (await call.dispatch("listHosts", {}))["host"]]
    items = [
        h for h in items
        if _match(call, h, "id", "id") and _match(call, h, "name", "name") and _match(call, h, "zoneid", "zoneid")
        and _match(call, h, "clusterid", "clusterid") and _match(call, h, "state", "state")
        and _match(call, h, "type", "type") and _keyword(call, h, "name")
    ]  # fmt: skip
    return paged(call, "host", items)


@command("listClusters", description="Lists clusters with their capacity.")
async def list_clusters(call: Call) -> dict[str, Any]:
    items = [shapes.cluster(c) for c in (await call.dispatch("listClusters", {}))["cluster"]]
    items = [
        c for c in items
        if _match(call, c, "id", "id") and _match(call, c, "name", "name") and _match(call, c, "zoneid", "zoneid")
    ]  # fmt: skip
    return paged(call, "cluster", items)


@command("listCapabilities", verb="listCapabilities", description="What this API server supports.")
async def list_capabilities(call: Call) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("moldd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "capability": {
            "cloudstackversion": "4.19.0.0",
            "moldd": version,
            "apilimitmax": 0,
            "apilimitinterval": 1,
            "allowusercreateprojects": False,
            "allowuserviewdestroyedvm": True,
            "allowuserexpungerecovervm": True,
            "dynamicrolesenabled": False,
            "kvmsnapshotenabled": True,
            "securitygroupsenabled": False,
            "supportELB": "false",
            "userpublictemplateenabled": False,
            "customdiskofferingmaxsize": 4096,
            "customdiskofferingminsize": 1,
            "kubernetesserviceenabled": False,
            "projectinviterequired": False,
            "regionsecondaryenabled": False,
        }
    }


@command("listApis", verb="listApis", description="The commands this API server answers, for this user's role.")
async def list_apis(call: Call) -> dict[str, Any]:
    role = Role.parse(call.actor.role or "admin")
    apis = [
        {"name": s.name, "isasync": s.is_async, "description": s.description, "since": "4.0.0",
         "type": "", "params": api_params(s), "response": [], "related": ""}
        for s in sorted(COMMANDS.values(), key=lambda s: s.name)
        if role >= required_role(s.verb)
    ]  # fmt: skip
    name = call.get("name")
    if name is not None:
        apis = [a for a in apis if str(a["name"]).lower() == name.lower()]
    return {"count": len(apis), "api": apis}


@command("listEvents", description="The newest log entries as CloudStack events, newest first (type, keyword).")
async def list_events(call: Call) -> dict[str, Any]:
    rows = (await call.dispatch("listEvents", {"limit": 10000, "newest": True}))["event"]
    out = [
        {"id": stable_uuid("event", str(e["position"])),
         "type": e.get("cloudstack_type") or e["event_type"].upper(),
         "state": e.get("cloudstack_state") or "Completed",
         "level": "ERROR" if e.get("cloudstack_state") == "Error" else "INFO",
         "description": f"{e['stream_id']}: {e['event_type']}", "username": e["actor"], "account": shapes.ACCOUNT,
         "domain": "ROOT", "domainid": shapes.DOMAIN_ID, "created": shapes.cs_time(e["recorded_at"]),
         "parentid": e.get("correlation_id") or "", "moldposition": e["position"]}
        for e in reversed(rows)
    ]  # fmt: skip
    out = [e for e in out if _keyword(call, e, "description", "type") and _match(call, e, "type", "type")]
    return paged(call, "event", out)


# -- users (CloudStack's names; moldd keeps no accounts or domains) ---------------------------------------
def _cs_user(u: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": u["id"], "username": u["name"], "apikey": u["apikey"],
        "state": "enabled" if u["state"] == "enabled" else "disabled",
        "roletype": {"admin": "Admin", "operator": "DomainAdmin", "readonly": "User"}.get(u["role"], "User"),
        "rolename": u["role"], "account": shapes.ACCOUNT, "accounttype": 1 if u["role"] == "admin" else 0,
        "domain": "ROOT", "domainid": shapes.DOMAIN_ID, "created": shapes.cs_time(u.get("created")),
    }  # fmt: skip


async def _user_name(call: Call) -> str:
    value = call.get("id") or call.need("username")
    if is_uuid(value):
        for u in (await call.dispatch("listUsers", {}))["user"]:
            if u["id"] == value:
                return str(u["name"])
        raise bad_value(call, "id", value)
    return value


@command("createUser", description="Creates a moldd user with an API key pair (role: admin, operator, readonly).")
async def create_user(call: Call) -> dict[str, Any]:
    result = await call.dispatch(
        "createUser", {"username": call.need("username"), "role": call.get("role") or call.get("rolename")}
    )
    return {"user": _cs_user(result["user"]) | {"secretkey": result["user"]["secretkey"]}}


@command("listUsers", description="Lists moldd users (never their secret keys).")
async def list_users(call: Call) -> dict[str, Any]:
    users = [_cs_user(u) for u in (await call.dispatch("listUsers", {}))["user"]]
    users = [u for u in users if _match(call, u, "id", "id") and _match(call, u, "username", "username")]
    return paged(call, "user", users)


@command("registerUserKeys", description="A new API key pair for a user; the old keys stop working.")
async def register_keys(call: Call) -> dict[str, Any]:
    result = await call.dispatch("registerUserKeys", {"username": await _user_name(call)})
    return {"userkeys": result["userkeys"]}


async def _revoke(call: Call) -> dict[str, Any]:
    result = await call.dispatch("revokeUser", {"username": await _user_name(call)})
    return {"user": _cs_user(result["user"])}


command("disableUser", verb="revokeUser", description="Revokes a user's API keys.")(_revoke)
command("deleteUser", verb="revokeUser", description="Revokes a user's API keys (the user stays in the log).")(_revoke)


@command("getUserKeys", verb="registerUserKeys", description="Refused: moldd shows a secret key only once.")
async def get_user_keys(call: Call) -> dict[str, Any]:
    raise CloudStackError(
        UNSUPPORTED_ACTION_ERROR,
        "moldd shows a secret key only when it is created; use registerUserKeys for a new pair",
        CS_PERMISSION_DENIED,
    )


# -- what generic clients ask on their way to a VM: answered, empty -----------------------------------------
EMPTY_LISTS = {
    "listNetworks": "network", "listNetworkOfferings": "networkoffering", "listPublicIpAddresses": "publicipaddress",
    "listSSHKeyPairs": "sshkeypair", "listSecurityGroups": "securitygroup", "listAffinityGroups": "affinitygroup",
    "listVPCs": "vpc", "listProjects": "project", "listFirewallRules": "firewallrule",
    "listEgressFirewallRules": "firewallrule", "listPortForwardingRules": "portforwardingrule",
    "listLoadBalancerRules": "loadbalancerrule", "listNics": "nic", "listTags": "tag", "listSnapshots": "snapshot",
    "listDiskOfferings": "diskoffering", "listVirtualRouterElements": "virtualrouterelement",
    "listRouters": "router", "listIpForwardingRules": "ipforwardingrule", "listVpnUsers": "vpnuser",
    "listRemoteAccessVpns": "remoteaccessvpn", "listKubernetesClusters": "kubernetescluster",
    "listUserData": "userdata", "listBackups": "backup",
}  # fmt: skip


def _empty(key: str) -> Handler:
    async def handler(call: Call) -> dict[str, Any]:
        return {"count": 0, key: []}

    return handler


for _name, _key in EMPTY_LISTS.items():
    command(_name, verb="listNetworks", description=f"Always empty: moldd manages no {_key}s.")(_empty(_key))


@command("listDomains", description="The one domain, ROOT.")
async def list_domains(call: Call) -> dict[str, Any]:
    return {"count": 1, "domain": [{"id": shapes.DOMAIN_ID, "name": "ROOT", "level": 0, "path": "ROOT", "haschild": False}]}


@command("listAccounts", description="The one account every moldd user acts in.")
async def list_accounts(call: Call) -> dict[str, Any]:
    account = {"id": stable_uuid("account", shapes.ACCOUNT), "name": shapes.ACCOUNT, "accounttype": 1,
               "domain": "ROOT", "domainid": shapes.DOMAIN_ID, "state": "enabled"}  # fmt: skip
    return {"count": 1, "account": [account]}
