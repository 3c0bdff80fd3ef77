"""moldd's read-model views → CloudStack response objects (field names and types as CloudStack writes them)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from moldd.domain.ids import stable_uuid
from moldd.projection.model import RecordView, View

DOMAIN_ID = stable_uuid("domain", "ROOT")
ACCOUNT = "admin"


def cs_time(iso: str | None) -> str | None:
    """CloudStack's ``yyyy-MM-dd'T'HH:mm:ssZ`` (``2026-11-30T17:45:02+0000``)."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return iso


def vm_uuid(vm: dict[str, Any]) -> str:
    return str(vm.get("uuid") or stable_uuid("vm", vm["name"]))


def snapshot_uuid(hex_id: str) -> str:
    try:
        return str(uuid.UUID(hex_id))
    except ValueError:
        return hex_id


def snapshot_key(cs_id: str) -> str:
    """A CloudStack VM snapshot id back to moldd's (32 hex digits)."""
    try:
        return uuid.UUID(cs_id).hex
    except ValueError:
        return cs_id


def zone_of(cluster: str | None) -> dict[str, Any]:
    name = cluster or "default"
    return {"zoneid": stable_uuid("zone", name), "zonename": name}


# moldd's states that CloudStack does not have, as CloudStack shows the same moment (clients such as
# Libcloud know only CloudStack's states). moldd's own state stays in ``moldstate``.
_CS_STATE = {"Created": "Stopped", "Creating": "Starting", "Destroying": "Stopping", "Expunged": "Expunging"}


def cs_state(state: str) -> str:
    return _CS_STATE.get(state, state)


# The CloudStack shape of a VM, kept while the read model's shared view of the VM (``View``) is the same
# object, i.e. until the VM changes; a list answer then costs a dictionary look-up and a spliced, already
# encoded JSON fragment per VM.
_SHAPED: dict[str, tuple[Any, View]] = {}


def virtual_machine(vm: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(vm, (RecordView, View)):
        return _virtual_machine(vm)
    hit = _SHAPED.get(vm["name"])
    if hit is not None and hit[0] is vm:
        return hit[1]
    shaped = View(_virtual_machine(vm))
    if len(_SHAPED) > 100_000:
        _SHAPED.clear()
    _SHAPED[vm["name"]] = (vm, shaped)
    return shaped


def _virtual_machine(vm: dict[str, Any]) -> dict[str, Any]:
    offering = vm.get("offering") or {}
    host = vm.get("host")
    out: dict[str, Any] = {
        "id": vm_uuid(vm),
        "name": vm["hostname"],
        "displayname": vm["display_name"],
        "instancename": vm["internal_name"],
        "state": cs_state(vm["state"]),
        "moldstate": vm["state"],
        "created": cs_time(vm.get("created_at")),
        "haenable": bool(vm.get("ha_enabled")),
        "cpunumber": offering.get("vcpus"),
        "memory": offering.get("memory_mib"),
        "cpuspeed": 0,
        "serviceofferingid": stable_uuid("offering", offering["name"]) if offering.get("name") else None,
        "serviceofferingname": offering.get("name"),
        "isdynamicallyscalable": bool(offering.get("dynamic")),
        "hypervisor": "KVM",
        "account": ACCOUNT,
        "domain": "ROOT",
        "domainid": DOMAIN_ID,
        "passwordenabled": False,
        "rootdevicetype": "ROOT",
        "rootdeviceid": 0,
        "guestosid": stable_uuid("ostype", vm.get("os_type") or "Other"),
        "ostypename": vm.get("os_type"),
        "nic": [],
        "securitygroup": [],
        "affinitygroup": [],
        "tags": [],
        "details": _details(vm.get("details") or {}),
        # moldd's own: the immutable VM name (moldd's id for it) and its HA state.
        "moldname": vm["name"],
        "hapolicy": vm.get("ha_policy"),
    }
    out |= zone_of(vm.get("cluster"))
    if host:
        out |= {"hostid": stable_uuid("host", host), "hostname": host}
    if vm.get("template"):
        out |= {"templateid": stable_uuid("template", vm["template"]), "templatename": vm["template"],
                "templatedisplaytext": vm["template"]}  # fmt: skip
    if vm.get("iso"):
        out |= {"isoid": stable_uuid("iso", vm["iso"]), "isoname": vm["iso"], "isodisplaytext": vm["iso"]}
    if vm.get("group"):
        out |= {"group": vm["group"], "groupid": stable_uuid("group", vm["group"])}
    if vm.get("description"):
        out["description"] = vm["description"]
    return {k: v for k, v in out.items() if v is not None}


def _details(details: dict[str, Any]) -> dict[str, str]:
    """CloudStack's details are a string → string map (typed clients such as Terraform's decode them so); a
    secret setting shows only that it is set."""
    out = {}
    for key, value in details.items():
        if isinstance(value, dict) and value.get("secret") == "set":
            out[key] = "(set)"
        elif isinstance(value, str):
            out[key] = value
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)
    return out


def volume(vm: dict[str, Any]) -> dict[str, Any]:
    """The root volume of a VM (moldd has one disk per VM)."""
    disk = vm.get("root_disk") or {}
    size_gb = float(disk.get("size_gb") or 0)
    out = {
        "id": stable_uuid("volume", vm_uuid(vm)),
        "name": f"ROOT-{vm['id']}",
        "type": "ROOT",
        "deviceid": 0,
        "size": int(size_gb * 1024**3),
        "state": "Ready" if disk.get("path") else "Allocated",
        "virtualmachineid": vm_uuid(vm),
        "vmname": vm["hostname"],
        "vmdisplayname": vm["display_name"],
        "vmstate": cs_state(vm["state"]),
        "created": cs_time(vm.get("created_at")),
        "storagetype": "shared",
        "hypervisor": "KVM",
        "account": ACCOUNT,
        "domain": "ROOT",
        "domainid": DOMAIN_ID,
        "path": disk.get("path"),
    }
    out |= zone_of(vm.get("cluster"))
    return {k: v for k, v in out.items() if v is not None}


def vm_snapshot(row: dict[str, Any], vm: dict[str, Any] | None) -> dict[str, Any]:
    out = {
        "id": snapshot_uuid(row["id"]),
        "name": row["name"],
        "displayname": row["name"],
        "description": row.get("description") or "",
        "state": row.get("state"),
        "type": row.get("type"),
        "current": bool(row.get("current")),
        "created": cs_time(row.get("created_at")),
        "parent": snapshot_uuid(row["parent"]) if row.get("parent") else None,
        "parentName": row.get("parent_name"),
        "account": ACCOUNT,
        "domain": "ROOT",
        "domainid": DOMAIN_ID,
    }
    if vm is not None:
        out |= {"virtualmachineid": vm_uuid(vm), "virtualmachinename": vm["hostname"]}
        out |= zone_of(vm.get("cluster"))
    return {k: v for k, v in out.items() if v is not None}


def instance_group(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": stable_uuid("group", group["name"]),
        "name": group["name"],
        "created": cs_time(group.get("created_at")),
        "account": ACCOUNT,
        "domain": "ROOT",
        "domainid": DOMAIN_ID,
    }


def host(h: dict[str, Any]) -> dict[str, Any]:
    health = h.get("health", "Up")
    state = {"Up": "Up", "Suspect": "Alert", "Down": "Down", "Fencing": "Alert", "Fenced": "Down",
             "FenceFailed": "Alert"}.get(health, "Up")  # fmt: skip
    out = {
        "id": stable_uuid("host", h["name"]),
        "name": h["name"],
        "state": state,
        "resourcestate": "Enabled",
        "type": "Routing",
        "hypervisor": "KVM",
        "clusterid": stable_uuid("cluster", h.get("cluster") or "default"),
        "clustername": h.get("cluster"),
        "ipaddress": h.get("uri"),
        "events": h.get("health_cause") or "",
        # moldd's own
        "health": health,
        "link": h.get("link"),
        "vms": h.get("vms"),
        "running": h.get("running"),
        "max_vms": h.get("max_vms"),
    }
    out |= zone_of(h.get("cluster"))
    return {k: v for k, v in out.items() if v is not None}


def cluster(c: dict[str, Any]) -> dict[str, Any]:
    name = c.get("cluster") or c.get("name") or "default"
    out = {
        "id": stable_uuid("cluster", name),
        "name": name,
        "hypervisortype": "KVM",
        "clustertype": "CloudManaged",
        "allocationstate": "Enabled",
        "managedstate": "Managed",
    }
    out |= zone_of(name)
    out |= {k: v for k, v in c.items() if k not in out}
    return out


def zone(z: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": z["id"],
        "name": z["name"],
        "allocationstate": "Enabled",
        "networktype": "Basic",
        "securitygroupsenabled": False,
        "localstorageenabled": True,
        "dhcpprovider": "none",
    }


def service_offering(o: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": o["id"],
        "name": o["name"],
        "displaytext": f"{o['vcpus']} vCPU, {o['memory_mib']} MiB",
        "cpunumber": o["vcpus"],
        "cpuspeed": 0,
        "memory": o["memory_mib"],
        "isdynamicallyscalable": bool(o.get("dynamic")),
        "storagetype": "shared",
        "offerha": True,
        "iscustomized": False,
    }
    if o.get("max_vcpus"):
        out["maxcpunumber"] = o["max_vcpus"]
    if o.get("max_memory_mib"):
        out["maxmemory"] = o["max_memory_mib"]
    return out


def template(t: dict[str, Any], zones: list[dict[str, Any]], *, iso: bool = False) -> list[dict[str, Any]]:
    """CloudStack lists a template once per zone it is in; moldd's templates are in every zone."""
    out = []
    for z in zones or [{"id": stable_uuid("zone", "default"), "name": "default"}]:
        out.append(
            {
                "id": t["id"],
                "name": t["name"],
                "displaytext": t["name"],
                "ostypeid": stable_uuid("ostype", t.get("os_type") or "Other"),
                "ostypename": t.get("os_type"),
                "isready": True,
                "ispublic": True,
                "isfeatured": True,
                "isextractable": False,
                "bootable": True,
                "format": "ISO" if iso else "QCOW2",
                "hypervisor": "KVM",
                "templatetype": "USER",
                "status": "Download Complete",
                "zoneid": z["id"],
                "zonename": z["name"],
                "account": ACCOUNT,
                "domain": "ROOT",
                "domainid": DOMAIN_ID,
            }
        )
    return out


def os_type(o: dict[str, Any]) -> dict[str, Any]:
    return {"id": o["id"], "description": o["name"], "oscategoryid": stable_uuid("oscategory", o["name"])}
