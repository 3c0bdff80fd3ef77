"""Where the time of a durable PostgreSQL append goes (issue 14): the same 64 appenders as bench/append.py
--store postgres, with the costs split between the client process and the database; optionally two source
trees side by side (before/after a change) in the same runs.

    python bench/pg_profile.py [--events 20000] [--runs 3] [--appenders 64] [--command-ids]
                               [--tree NAME=PATH ...] [--no-fsync-off] [--pin] [--loop uvloop]

A throw-away server (moldlab.testing.pgserver, ``fsync=on``, ``synchronous_commit=on``) and, for comparison in the
same run, one with ``fsync=off`` (every COMMIT still waits for the WAL write, not for the disk). Each measurement
runs in a child process that imports ``events`` from the tree given (default: this one), on a fresh schema;
trees and servers alternate within every run. Per tree and server: events/s; groups (COMMITs) and their mean
size; the mean time from handing a group over to its COMMIT returning; the client's CPU per event (validation,
encoding, chaining, settling the callers, the driver); the CPU per event of the database backend that runs the
COMMITs (read from /proc: COPY, index and trigger work, WAL writes and fsync calls); WAL bytes per event.
min/median/max of --runs, the ratio of each tree's events/s to the first tree's (per run), and the load average
first and last. The last line is a JSON object of the medians.

With 64 appenders that each await their append, a group is at most 64 events and the next one only forms once
it is answered, so one group's cycle is the sum of the client's CPU for 64 events, the server's, the COMMIT's
flush and the wake-ups: events/s = 64 / cycle. Client and server CPU per event show what is left to cut and how
the two cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt, footer, header, medians
from moldlab.testing.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process with the tree under test first on sys.path: only the store's public API and two
# attributes every version of it has (the writer's on_commit hook, the write connection).
CHILD = r"""
import asyncio, json, os, sys, time
tree, dsn, schema, n, appenders, command_ids, cpus, loop = sys.argv[1:9]
sys.path.insert(0, tree)
if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
if loop == "uvloop":
    import uvloop
    uvloop.install()
from events import NewEvent
from events.postgres import PostgresEventStore

def cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def main():
    store = await PostgresEventStore.async_open(dsn, schema=schema)
    commits = []
    store._writer.on_commit = lambda size, seconds, ok: commits.append(seconds)
    conn = await store._async_write_conn()
    pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
    lsn = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"
    wal0 = float(await store._pool.fetchval(lsn))
    k_appenders = int(appenders)
    per = max(1, int(n) // k_appenders)
    with_ids = command_ids == "1"

    async def appender(i):
        for k in range(per):
            payload = {"vm": f"vm-{i}", "k": k, "host": "kvm1", "state": "Running"}
            await store.async_append(f"vm-{i}", [NewEvent("vm.bench", payload, actor="bench")],
                                     command_id=f"cmd-{i}-{k}" if with_ids else None)

    b0, c0, t0 = cpu_s(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(k_appenders)))
    elapsed, client, backend = time.perf_counter() - t0, time.process_time() - c0, cpu_s(pid) - b0
    wal = float(await store._pool.fetchval(lsn)) - wal0
    await store.async_close()
    m = per * k_appenders
    print(json.dumps({
        "eps": m / elapsed,
        "groups": len(commits),
        "group_size": m / max(1, len(commits)),
        "commit_ms": sum(commits) / max(1, len(commits)) * 1e3,
        "client_us_per_event": client / m * 1e6,
        "backend_us_per_event": backend / m * 1e6,
        "wal_bytes_per_event": wal / m,
    }))

asyncio.run(main())
"""

LABELS: dict[str, tuple[str, int]] = {
    "eps": (" ev/s", 0),
    "groups": ("", 0),
    "group_size": (" events", 1),
    "commit_ms": (" ms", 2),
    "client_us_per_event": (" µs", 1),
    "backend_us_per_event": (" µs", 1),
    "wal_bytes_per_event": (" B", 0),
}


def run_child(tree: Path, loop: str, pg: PgServer, schema: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, "-c", CHILD, str(tree), pg.dsn(), schema, str(args.events), str(args.appenders)]
    argv += ["1" if args.command_ids else "0", "0" if args.pin else "", loop]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"the run of {tree} failed:\n{r.stderr[-3000:]}")
    result: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def pin_server(pg: PgServer, cpu: int) -> None:
    """Put the postmaster and its processes on `cpu`; backends forked later inherit it."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(postmaster):
            pids.append(int(status.parent.name))
    for pid in pids:
        os.sched_setaffinity(pid, {cpu})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--appenders", type=int, default=64)
    ap.add_argument("--command-ids", action="store_true", help="every append carries a command id")
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a source tree to measure (repeat to compare, e.g. before=/path/to/main after=.; default: this one)",
    )
    ap.add_argument("--no-fsync-off", action="store_true", help="only the durable server")
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        action="append",
        default=[],
        help="the client's event loop (default uvloop: the daemon's default, as in bench/append.py); repeat to "
        "compare",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the client on CPU 0 and every PostgreSQL process on CPU 1 (as if the server had a machine of its own)",
    )
    args = ap.parse_args()
    trees: list[tuple[str, Path]] = []
    for spec in args.tree or [f"this={ROOT}"]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path, "events", "postgres.py").exists():
            ap.error(f"--tree {spec!r}: expected NAME=PATH of a source tree holding events/postgres.py")
        trees.append((name, Path(path).resolve()))
    loops = args.loop or ["uvloop"]
    variants = [
        (name if len(loops) == 1 else f"{name}-{loop}", tree, loop) for name, tree in trees for loop in loops
    ]
    header("bench/pg_profile.py")
    print(f"{args.events} events per run, {args.appenders} appenders, command ids: {args.command_ids}, "
          f"pinned: {args.pin}; measured: " + ", ".join(f"{n} ({p}, {lp})" for n, p, lp in variants),
          flush=True)  # fmt: skip
    results: dict[str, list[float]] = {}
    servers = [("fsync_on", True)] + ([] if args.no_fsync_off else [("fsync_off", False)])
    with PgServer(fsync=True) as durable, PgServer(fsync=False) as volatile:
        pgs = {"fsync_on": durable, "fsync_off": volatile}
        if args.pin:
            for pg in pgs.values():
                pin_server(pg, 1)
        for r in range(args.runs):
            for sname, _ in servers:
                for tname, tree, loop in variants:
                    got = run_child(tree, loop, pgs[sname], f"p_{tname}_{r}".lower().replace("-", "_"), args)
                    for key, value in got.items():
                        results.setdefault(f"{sname}_{tname}_{key}", []).append(value)
            print(f"  run {r + 1}/{args.runs} done", flush=True)
    for sname, _ in servers:
        print(f"{sname.replace('_', '=')}:")
        for tname, _, _ in variants:
            print(f"  {tname}:")
            for key, (unit, digits) in LABELS.items():
                print(f"    {key:22s} {fmt(results[f'{sname}_{tname}_{key}'], unit, digits)}")
        base = variants[0][0]
        for tname, _, _ in variants[1:]:
            ratio = [
                a / b
                for a, b in zip(results[f"{sname}_{tname}_eps"], results[f"{sname}_{base}_eps"], strict=True)
            ]
            results[f"{sname}_ratio_{tname}_to_{base}"] = ratio
            print(f"  ratio {tname} / {base} events/s (per run): {fmt(ratio, 'x', 2)}")
    out: dict[str, Any] = medians(results)
    footer()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
