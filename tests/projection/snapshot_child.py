"""Child of test_snapshot_stop.py: folds the log at argv[1], then writes snapshots in a loop, one event appended
before each (so each is new), printing ``WRITING n`` as each starts and ``DONE n`` when it is stored; killed -9."""

from __future__ import annotations

import asyncio
import sys

from events import NewEvent, SQLiteEventStore
from moldd.app.projector import Projector


async def main(path: str) -> None:
    store = await SQLiteEventStore.async_open(path)
    p = Projector(store, snapshot_every=1)
    await p.async_restore()
    p.start()
    n = 0
    while True:
        res = await store.async_append("vm-kill", [NewEvent("vm.bench", {"n": n})])
        await p.async_wait(res.last_position)
        print(f"WRITING {n}", flush=True)
        await p.async_snapshot()
        print(f"DONE {n} {p.snapshot_position}", flush=True)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
