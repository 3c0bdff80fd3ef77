"""Replay: read + verify the chain + fold, over a log of N events.

    python bench/replay.py --events N [--db PATH]

The log is built with a bulk path (sqlite3 executemany of rows chained with events.chain, the same
bytes the writer produces; the build is not timed). The timed pass is `events.verify` (read every row,
recompute every hash, check positions, stream versions, time) with a cheap fold (events per type and
per stream) called on each row. A second figure times the full typed path (`async_fold`, JSON-decoding
every payload) on up to 200k events. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import SQLiteEventStore, StoredEvent, async_fold, verify
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.sqlite import INSERT_EVENT


def build(path: Path, n: int) -> None:
    asyncio.run(_create(path))
    conn = sqlite3.connect(path, isolation_level=None)
    log_id = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]
    conn.execute("PRAGMA synchronous = OFF")
    prev = genesis_hash(log_id)
    versions: dict[str, int] = {}
    ts = time.time_ns() // 1000
    types = ["vm.start.requested", "vm.started", "vm.stop.requested", "vm.stopped"]
    batch: list[tuple[Any, ...]] = []
    conn.execute("BEGIN")
    for pos in range(1, n + 1):
        sid = f"vm-{pos % 1000}"
        et = types[pos % 4]
        v = versions[sid] = versions.get(sid, 0) + 1
        cid = f"cmd-{pos // 2}"
        payload = canonical_json({"host": f"h{pos % 7}", "n": pos})
        fields = encode_fields(sid, et, "uid=0", cid, None, cid)
        h = link_hash(prev, pos, v, ts + pos, 1, fields, payload)
        batch.append((pos, sid, v, et, 1, ts + pos, "uid=0", cid, None, cid, payload, prev, h))
        prev = h
        if len(batch) == 50_000:
            conn.executemany(INSERT_EVENT, batch)
            batch.clear()
    if batch:
        conn.executemany(INSERT_EVENT, batch)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def _create(path: Path) -> None:
    await (await SQLiteEventStore.async_open(path)).async_close()


class Count:
    def initial(self) -> Counter[str]:
        return Counter()

    def apply(self, state: Counter[str], event: StoredEvent) -> Counter[str]:
        state[event.event_type] += 1
        return state

    def to_snapshot(self, state: Counter[str]) -> dict[str, Any]:
        return dict(state)

    def from_snapshot(self, data: dict[str, Any]) -> Counter[str]:
        return Counter(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, default=None)
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "replay.db"
        if path.exists():
            path.unlink()
        t0 = time.perf_counter()
        build(path, n)
        print(f"built {n} events in {time.perf_counter() - t0:.1f} s")

        per_type: Counter[str] = Counter()

        def fold(row: tuple[Any, ...]) -> None:
            per_type[row[3]] += 1

        t0 = time.perf_counter()
        report = verify(path, on_row=fold)
        dt = time.perf_counter() - t0
        assert report.exit_code == 0 and report.events_checked == n and sum(per_type.values()) == n, report.render()
        eps = n / dt
        print(f"read + verify chain + fold: {n} events in {dt:.2f} s = {eps:,.0f} events/s")

        m = min(n, 200_000)

        async def typed() -> float:
            store = await SQLiteEventStore.async_open(path)
            t = time.perf_counter()
            state = await async_fold(store, Count()) if m == n else None
            if state is None:
                from events.replay import async_replay

                state = (await async_replay(store, Count(), to_position=m)).state
            took = time.perf_counter() - t
            await store.async_close()
            assert sum(state.values()) == m
            return m / took

        typed_eps = asyncio.run(typed())
        print(f"typed async_fold (StoredEvent + json payload decode), {m} events: {typed_eps:,.0f} events/s")
    print(json.dumps({"events": n, "replay_verify_eps": round(eps), "typed_fold_eps": round(typed_eps)}))


if __name__ == "__main__":
    main()
