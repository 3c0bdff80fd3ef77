"""Host verbs for operators: when fencing cannot confirm a dead host, a person who has checked (pulled the plug,
looked at the PDU) says so; HA then treats the host as fenced and moves its VMs."""

from __future__ import annotations

from events import NewEvent
from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.service import App, Command, verb
from moldd.domain.errors import InvalidState, NotFound
from moldd.domain.ha import HostHealth


@verb("confirmHostFenced")
async def confirm_host_fenced(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"host", "reason"}, {"id": "host", "hostid": "host", "name": "host"})
    name = a.text("host")
    reason = a.text("reason", "operator confirmed the host is powered off", max_len=500, multiline=True)
    async with app.claim(f"host-{name}"):
        host = app.model.hosts.get(name)
        if host is None:
            raise NotFound(f"no host {name!r}", field="host")
        if host.health not in (HostHealth.DOWN, HostHealth.FENCE_FAILED, HostHealth.FENCING):
            raise InvalidState(
                f"host {name} is {host.health}: only a Down host, or one whose fencing failed, can be confirmed fenced",
                field="host",
            )
        if app.hosts is not None and app.hosts.is_connected(name):
            raise InvalidState(f"host {name} answers again: it is not powered off", field="host")
        ev = NewEvent(
            "host.health",
            {"from": host.health, "to": "Fenced", "cause": reason, "confirmed_by_operator": True},
            actor=str(cmd.actor),
            causation_id=cmd.id,
        )
        res = await app.async_append(f"host-{name}", [ev], command_id=cmd.id)
    return CommandReply(result={"host": app.model.hosts[name].to_dict()}, position=res.last_position)
