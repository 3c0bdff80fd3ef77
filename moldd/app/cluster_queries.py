"""``listManagementServers`` (``moldctl cluster status``): the moldd nodes sharing the log, who leads, lag."""

from __future__ import annotations

from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.service import App, Command, verb


@verb("listManagementServers")
async def list_management_servers(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())  # no arguments: refuse unknown ones
    if app.cluster is None:
        result = {
            "mode": "single",
            "role": "leader",
            "database": str(app.config.database),
            "position": app.model.position,
            "nodes": [],
        }
    else:
        result = {"mode": "cluster", **await app.cluster.async_status()}
    return CommandReply(result=result, position=app.model.position)
