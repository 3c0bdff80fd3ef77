"""Durable appends on PostgreSQL beside SQLite, in one run: the same 64 concurrent appenders through the
group-commit writer, the same events, on each store.

    python bench/append_pg.py --events N [--runs R]

SQLite: WAL + synchronous=FULL in a temporary directory. PostgreSQL: a throw-away server started here
(moldlab.testing.pgserver: initdb + pg_ctl as an unprivileged user, Unix socket, fsync=on,
synchronous_commit=on: every COMMIT is flushed before the appenders are answered), its data directory in /tmp.
Each run writes a fresh log. The last line is a JSON object (events/s per store: min/median/max of the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import EventStore, NewEvent, SQLiteEventStore
from events.postgres import PostgresEventStore
from moldlab.testing.pgserver import PgServer

APPENDERS = 64


async def run(store: EventStore, n: int, appenders: int = APPENDERS) -> float:
    per = n // appenders

    async def appender(i: int) -> None:
        stream = f"vm-{i}"
        for k in range(per):
            await store.async_append(stream, [NewEvent("vm.bench", {"i": i, "k": k}, actor="bench")])

    t0 = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(appenders)))
    elapsed = time.perf_counter() - t0
    await store.async_close()
    return per * appenders / elapsed


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values)), "median": round(statistics.median(values)), "max": round(max(values))}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--appenders", type=int, default=APPENDERS, help="concurrent appenders (one event each)")
    args = ap.parse_args()
    results: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    with PgServer(fsync=True) as pg, tempfile.TemporaryDirectory() as tmp:
        sync = pg.psql("SHOW synchronous_commit") + "/fsync=" + pg.psql("SHOW fsync")
        for r in range(args.runs):
            sq = await SQLiteEventStore.async_open(Path(tmp) / f"log{r}.db")
            results["sqlite"].append(await run(sq, args.events, args.appenders))
            pgs = await PostgresEventStore.async_open(pg.dsn(), schema=f"bench{r}")
            results["postgres"].append(await run(pgs, args.events, args.appenders))
            print(
                f"run {r + 1}: sqlite {results['sqlite'][-1]:,.0f} events/s, "
                f"postgres ({sync}) {results['postgres'][-1]:,.0f} events/s"
            )
    out = {k: summary(v) for k, v in results.items()}
    out["ratio_postgres_to_sqlite"] = round(out["postgres"]["median"] / out["sqlite"]["median"], 2)  # type: ignore[assignment]
    out["events"] = args.events  # type: ignore[assignment]
    out["appenders"] = args.appenders  # type: ignore[assignment]
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
