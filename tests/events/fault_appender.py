"""Child process for the SIGKILL test: appends under load, prints each acknowledged append.

    python fault_appender.py DB ROUND
Each line "ACK <command_id> <first_position> <last_position>" is printed only after async_append returned.
"""

from __future__ import annotations

import asyncio
import sys

from events import NewEvent, SQLiteEventStore


async def main(db: str, round_no: str) -> None:
    store = await SQLiteEventStore.async_open(db)
    out = sys.stdout

    async def appender(i: int) -> None:
        k = 0
        while True:
            cid = f"r{round_no}-a{i}-{k}"
            evs = [NewEvent("load.step", {"i": i, "k": k, "part": p}) for p in range(3)]
            res = await store.async_append(f"load-{i}", evs, command_id=cid)
            out.write(f"ACK {cid} {res.events[0].position} {res.last_position}\n")
            out.flush()
            k += 1

    await asyncio.gather(*(appender(i) for i in range(16)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
