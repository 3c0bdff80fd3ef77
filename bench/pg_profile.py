"""Where the time of a durable PostgreSQL append goes (issue 14): the same 64 appenders as bench/append.py
--store postgres, with the costs split between this process and the database.

    python bench/pg_profile.py [--events 20000] [--runs 3] [--appenders 64]

A throw-away server (moldlab.testing.pgserver, ``fsync=on``, ``synchronous_commit=on``) and, for comparison in the
same run, one with ``fsync=off`` (every COMMIT still waits for the WAL write, not for the disk). Per run and server:
events/s; groups (COMMITs) and their mean size; the mean time from sending a group to its COMMIT returning; this
process's CPU per event (validation, encoding, chaining, settling the callers, the driver); the CPU per event of
the database backend that runs the COMMITs (read from /proc: INSERTs through COPY, index and trigger work, WAL
writes and fsync calls); WAL bytes per event. min/median/max of --runs; the load average first and last. The
last line is a JSON object of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_s, fmt, footer, header, medians
from events import NewEvent
from events.postgres import PostgresEventStore
from moldlab.testing.pgserver import PgServer


async def run_once(pg: PgServer, schema: str, n: int, appenders: int) -> dict[str, float]:
    store = await PostgresEventStore.async_open(pg.dsn(), schema=schema)
    commits: list[tuple[int, float]] = []
    store._writer.on_commit = lambda size, seconds, ok: commits.append((size, seconds))
    conn = await store._async_write_conn()
    pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
    lsn = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"
    wal0 = float(await store._pool.fetchval(lsn))
    per = max(1, n // appenders)

    async def appender(i: int) -> None:
        for k in range(per):
            payload = {"vm": f"vm-{i}", "k": k, "host": "kvm1", "state": "Running"}
            await store.async_append(f"vm-{i}", [NewEvent("vm.bench", payload, actor="bench")])

    b0, c0, t0 = cpu_s(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(appenders)))
    elapsed, client, backend = time.perf_counter() - t0, time.process_time() - c0, cpu_s(pid) - b0
    wal = float(await store._pool.fetchval(lsn)) - wal0
    await store.async_close()
    m = per * appenders
    return {
        "eps": m / elapsed,
        "groups": len(commits),
        "group_size": m / max(1, len(commits)),
        "commit_ms": sum(s for _, s in commits) / max(1, len(commits)) * 1e3,
        "client_us_per_event": client / m * 1e6,
        "backend_us_per_event": backend / m * 1e6,
        "wal_bytes_per_event": wal / m,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--appenders", type=int, default=64)
    args = ap.parse_args()
    header("bench/pg_profile.py")
    results: dict[str, list[float]] = {}
    with PgServer(fsync=True) as durable, PgServer(fsync=False) as volatile:
        for r in range(args.runs):
            for name, pg in (("fsync_on", durable), ("fsync_off", volatile)):
                for key, value in (await run_once(pg, f"p{r}", args.events, args.appenders)).items():
                    results.setdefault(f"{name}_{key}", []).append(value)
            print(f"  run {r + 1}/{args.runs} done", flush=True)
    labels: dict[str, tuple[str, int]] = {
        "eps": (" ev/s", 0),
        "groups": ("", 0),
        "group_size": (" events", 1),
        "commit_ms": (" ms", 2),
        "client_us_per_event": (" µs", 1),
        "backend_us_per_event": (" µs", 1),
        "wal_bytes_per_event": (" B", 0),
    }
    for name in ("fsync_on", "fsync_off"):
        print(f"{name.replace('_', '=')}:")
        for key, (unit, digits) in labels.items():
            print(f"  {key:22s} {fmt(results[f'{name}_{key}'], unit, digits)}")
    out: dict[str, Any] = medians(results)
    footer()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
