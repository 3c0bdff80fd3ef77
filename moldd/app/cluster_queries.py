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
            "nodes": {},
        }
    else:
        status = await app.cluster.async_status()
        # nodes by name (an object, so moldctl shows the whole status as key/value lines)
        status["nodes"] = {n["node"]: {k: v for k, v in n.items() if k != "node"} for n in status["nodes"]}
        result = {"mode": "cluster", **status}
    return CommandReply(result=result, position=app.model.position)
