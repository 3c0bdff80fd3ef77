"""A candidate in its own process (for SIGSTOP/kill tests): leads when elected, appends a tick every 50 ms
while `is_leading()`, prints every change of role on stdout (one JSON object a line)."""

from __future__ import annotations

import asyncio
import json
import sys

from events import FencedError, NewEvent
from events.leader import Leadership, Timings
from events.postgres import PostgresEventStore


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


async def main(dsn: str, schema: str, node: str) -> None:
    store = await PostgresEventStore.async_open(dsn, schema=schema)

    async def elected(epoch: int, cause: str) -> None:
        say(role="leader", epoch=epoch, cause=cause)

    lead = Leadership(
        store,
        node,
        Timings(lease_s=2.0, heartbeat_s=0.3, fence_after_s=1.2, retry_s=0.2),
        on_elected=elected,
        on_deposed=lambda cause: say(role="standby", cause=cause),
    )
    lead.start()
    say(role="candidate")
    i = 0
    while True:
        await asyncio.sleep(0.05)
        if lead.is_leading():
            try:
                await store.async_append(
                    f"tick-{node}", [NewEvent("tick", {"node": node, "epoch": lead.epoch, "i": i})]
                )
                i += 1
            except FencedError as exc:
                say(fenced=str(exc))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
