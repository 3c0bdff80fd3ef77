"""What a cluster offers, from the configuration: zones, service offerings, templates, ISOs, OS types.

Read verbs (they write nothing). Every item carries a stable ``id`` (:func:`moldd.domain.ids.stable_uuid`)
beside its name, so CloudStack clients can refer to it by either."""

from __future__ import annotations

from typing import Any

from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.service import App, Command, verb
from moldd.domain.ids import stable_uuid


def zones(app: App) -> list[dict[str, Any]]:
    """A zone per cluster (CloudStack's zone ⊃ cluster; moldd has no level in between)."""
    clusters = sorted({h.cluster for h in app.config.hosts})
    return [
        {"name": c, "id": stable_uuid("zone", c), "clusters": [c],
         "hosts": [h.name for h in app.config.hosts if h.cluster == c]}
        for c in clusters
    ]  # fmt: skip


def _reply(app: App, key: str, items: list[dict[str, Any]]) -> CommandReply:
    return CommandReply(result={"count": len(items), key: items}, position=app.model.position)


@verb("listZones")
async def list_zones(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    return _reply(app, "zone", zones(app))


@verb("listServiceOfferings")
async def list_offerings(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    items = [
        {"name": o.name, "id": stable_uuid("offering", o.name), "vcpus": o.vcpus, "memory_mib": o.memory_mib,
         "dynamic": o.dynamic, "max_vcpus": o.max_vcpus, "max_memory_mib": o.max_memory_mib}
        for o in app.config.offerings
    ]  # fmt: skip
    return _reply(app, "serviceoffering", items)


@verb("listTemplates")
async def list_templates(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    items = [
        {"name": t.name, "id": stable_uuid("template", t.name), "os_type": t.os_type, "image": str(t.image)}
        for t in app.config.templates
    ]
    return _reply(app, "template", items)


@verb("listIsos")
async def list_isos(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    items = [
        {"name": i.name, "id": stable_uuid("iso", i.name), "os_type": i.os_type, "path": str(i.path)}
        for i in app.config.isos
    ]
    return _reply(app, "iso", items)


@verb("listOsTypes")
async def list_os_types(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    names = sorted(
        {t.os_type for t in app.config.templates}
        | {i.os_type for i in app.config.isos}
        | {v.os_type for v in app.model.vms.values()}
        | {"Linux", "Other"}
    )
    return _reply(app, "ostype", [{"name": n, "id": stable_uuid("ostype", n)} for n in names])
