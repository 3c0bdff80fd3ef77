"""Durable appends: 64 concurrent appenders through the group-commit writer vs 1 transaction per event.

    python bench/append.py --events N [--db PATH]

Both sides use WAL + synchronous=FULL; the baseline inserts the same kind of rows (with a hash chain) with
aiosqlite, one BEGIN IMMEDIATE/INSERT/COMMIT per event. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import NewEvent, SQLiteEventStore
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.sqlite import INSERT_EVENT, SCHEMA

APPENDERS = 64


async def bench_group(path: Path, n: int) -> float:
    store = await SQLiteEventStore.async_open(path)
    per = n // APPENDERS

    async def appender(i: int) -> None:
        stream = f"vm-{i}"
        for k in range(per):
            await store.async_append(stream, [NewEvent("vm.bench", {"i": i, "k": k}, actor="bench")])

    t0 = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(APPENDERS)))
    elapsed = time.perf_counter() - t0
    await store.async_close()
    return per * APPENDERS / elapsed


async def bench_naive(path: Path, n: int) -> float:
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    await conn.execute("PRAGMA journal_mode = WAL")
    await conn.execute("PRAGMA synchronous = FULL")
    for stmt in SCHEMA:
        await conn.execute(stmt)
    prev = genesis_hash("naive")
    versions: dict[str, int] = {}
    position = 0
    lock = asyncio.Lock()
    per = n // APPENDERS

    async def appender(i: int) -> None:
        nonlocal prev, position
        stream = f"vm-{i}"
        for k in range(per):
            async with lock:  # one connection: one transaction at a time
                payload = canonical_json({"i": i, "k": k})
                fields = encode_fields(stream, "vm.bench", "bench", None, None, None)
                position += 1
                v = versions[stream] = versions.get(stream, 0) + 1
                ts = time.time_ns() // 1000
                h = link_hash(prev, position, v, ts, 1, fields, payload)
                row = (position, stream, v, "vm.bench", 1, ts, "bench", None, None, None, payload, prev, h)
                await conn.execute("BEGIN IMMEDIATE")
                await conn.execute(INSERT_EVENT, row)
                await conn.execute("COMMIT")
                prev = h

    t0 = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(APPENDERS)))
    elapsed = time.perf_counter() - t0
    await conn.close()
    return per * APPENDERS / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000, help="events for the group-commit run")
    ap.add_argument("--naive-events", type=int, default=None, help="events for the baseline (default N/20)")
    ap.add_argument("--db", type=Path, default=None, help="keep the group-commit log at this path")
    args = ap.parse_args()
    n = args.events
    n_naive = args.naive_events or max(APPENDERS, min(n // 20, 20_000))
    with tempfile.TemporaryDirectory() as tmp:
        naive_eps = await bench_naive(Path(tmp) / "naive.db", n_naive)
        print(f"naive (aiosqlite, 1 transaction per event, {n_naive} events): {naive_eps:,.0f} events/s")
        db = args.db or Path(tmp) / "group.db"
        if args.db is not None and db.exists():
            os.unlink(db)
        group_eps = await bench_group(db, n)
        print(f"group commit ({APPENDERS} appenders, {n} events): {group_eps:,.0f} events/s")
    ratio = group_eps / naive_eps
    print(f"ratio: {ratio:.1f}x")
    print(json.dumps({"naive_eps": round(naive_eps), "group_eps": round(group_eps), "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    asyncio.run(main())
