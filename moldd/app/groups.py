"""VM groups: createInstanceGroup, listInstanceGroups, deleteInstanceGroup."""

from __future__ import annotations

from events import NO_STREAM, NewEvent
from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.service import App, Command, verb
from moldd.domain.errors import Conflict, InvalidState, NotFound
from moldd.domain.names import validate_group_name


@verb("createInstanceGroup")
async def create_group(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"name", "description"})
    name = validate_group_name(a.raw("name"), field="name")
    description = a.text("description", "", max_len=1024, multiline=True)
    async with app.claim(f"group-{name}"):
        if name in app.model.groups:
            raise Conflict(f"VM group {name!r} already exists", field="name")
        stream = f"group-{name}"
        ev = NewEvent(
            "group.created",
            {"name": name, "description": description},
            actor=str(cmd.actor),
            causation_id=cmd.id,
        )
        current = await app.store.async_read_stream(stream)
        version = current[-1].stream_version if current else NO_STREAM
        res = await app.async_append(stream, [ev], expected_version=version, command_id=cmd.id)
    return CommandReply(result={"group": app.model.groups[name].to_dict()}, position=res.last_position)


@verb("listInstanceGroups")
async def list_groups(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    groups = []
    for g in sorted(app.model.groups.values(), key=lambda g: g.name):
        view = g.to_dict()
        view["vms"] = sorted(
            v.name for v in app.model.vms.values() if v.group == g.name and v.state != "Expunged"
        )
        groups.append(view)
    return CommandReply(result={"count": len(groups), "instancegroup": groups}, position=app.model.position)


@verb("deleteInstanceGroup")
async def delete_group(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"name", "ungroup"}, {"id": "name"})
    name = a.text("name")
    # CloudStack's deleteInstanceGroup takes the VMs out of the group; moldd's own API asks for that
    # explicitly (ungroup=true) and otherwise refuses to delete a group that still holds VMs.
    ungroup = a.boolean("ungroup", False)
    async with app.claim(f"group-{name}"):
        if name not in app.model.groups:
            raise NotFound(f"no VM group {name!r}", field="name")
        members = [v.name for v in app.model.vms.values() if v.group == name and v.state != "Expunged"]
        for member in members if ungroup else ():
            async with app.claim(member):
                await app.async_append(
                    f"vm-{member}",
                    [NewEvent("vm.updated", {"changes": {"group": None}, "reason": f"group {name} deleted"},
                              actor=str(cmd.actor), causation_id=cmd.id, correlation_id=cmd.id)],
                )  # fmt: skip
        if members and not ungroup:
            raise InvalidState(
                f"VM group {name!r} still holds {len(members)} VM(s) ({', '.join(members[:5])}): move them out first",
                field="name",
            )
        ev = NewEvent("group.deleted", {"name": name}, actor=str(cmd.actor), causation_id=cmd.id)
        res = await app.async_append(f"group-{name}", [ev], command_id=cmd.id)
    return CommandReply(result={"group": {"name": name, "deleted": True, "ungrouped": members if ungroup else []}}, position=res.last_position)
