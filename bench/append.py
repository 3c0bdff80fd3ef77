"""Durable appends, side by side in one run: the physical floors, a fair naive baseline, moldd's group-commit
writer and the ``eventsourcing`` library, sequential (one appender) and concurrent (``--appenders``, 64).

    python bench/append.py [--events N] [--runs 3] [--store sqlite|postgres] [--dir PATH] [--skip-peer]

Every contender writes the same kind of event (a ~50-byte JSON payload on one of 64 streams) durably: SQLite in
WAL mode with ``synchronous=FULL`` (each COMMIT is fsynced before the append returns).

- floor ``fsync/s``: ``os.fsync`` of a 4 KiB write in a loop, in the log's directory: the most durable commits
  per second this disk can take, whatever the software.
- floor ``CPU/event``: the CPU of encoding one event (canonical JSON + the chain's field encoding) and its SHA-256
  link, without any I/O: the least CPU a chained log must spend per event.
- ``naive``: stdlib ``sqlite3``, the store's own pragmas, schema (``events.sqlite.migrate``: the same tables,
  indexes and append-only triggers) and hash chain, one ``BEGIN IMMEDIATE``/INSERT/``COMMIT`` per event.
  Concurrent: ``--appenders`` threads, each with its own connection, reading the head inside its transaction.
- ``moldd``: ``SQLiteEventStore.async_append`` (the store chosen with ``--store``), one await per event;
  sequential = one appender awaiting each append; concurrent = ``--appenders`` coroutines (group commit). On
  the event loop the daemon ships with (uvloop, ``[daemon] event_loop``) unless ``--loop asyncio``; printed.
- ``moldd postgres`` (``--store postgres``): the same moldd rows on PostgreSQL as well, in the same runs, beside
  moldd on SQLite (``PostgresSide``: a throw-away server, ``fsync=on``, ``synchronous_commit=on``).
- ``eventsourcing`` (optional ``bench`` extra): its SQLite recorder (WAL; ``synchronous=FULL`` set here), one
  ``Application.save`` per event; concurrent = ``--appenders`` threads. Skipped if the package is missing.

For every contender: events/s, the bytes handed to ``write()`` per event (``wchar`` of /proc/self/io: WAL
frames, checkpoints, everything) and the CPU per event of this process (user + system, every thread: the event
loop and SQLite's), min/median/max of ``--runs`` runs. The load average is printed first and last. The last line
is a JSON object of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_s, fmt, footer, header, medians, proc_io
from events import EventStore, NewEvent, SQLiteEventStore
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.sqlite import INSERT_EVENT, PAGE_SIZE, migrate, tuning

STREAMS = 64

# ---------------------------------------------------------------------------------------------- stores
# A store is chosen by name (--store). Another backend (e.g. PostgreSQL) registers an opener here: an async
# function (directory for any files, run number) -> an open EventStore on an empty log.
StoreOpener = Callable[[Path, int], Awaitable[EventStore]]


async def _open_sqlite(directory: Path, run: int) -> EventStore:
    return await SQLiteEventStore.async_open(directory / f"moldd-{run}.db")


STORES: dict[str, StoreOpener] = {"sqlite": _open_sqlite}
try:  # optional backends register themselves if present
    from events import postgres as _pg  # type: ignore[attr-defined]

    if hasattr(_pg, "bench_opener"):
        STORES["postgres"] = _pg.bench_opener
except ImportError:
    pass


def payload(i: int, k: int) -> dict[str, Any]:
    return {"vm": f"vm-{i}", "k": k, "host": "kvm1", "state": "Running"}


# ---------------------------------------------------------------------------------------------- floors
def fsync_per_s(directory: Path, seconds: float = 1.0) -> float:
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"x" * 4096
    n = 0
    try:
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            os.pwrite(fd, block, (n % 16) * 4096)
            os.fsync(fd)
            n += 1
    finally:
        os.close(fd)
        path.unlink()
    return n / elapsed


def cpu_us_per_event(n: int = 20_000) -> float:
    prev = genesis_hash("floor")
    t0 = time.process_time()
    for k in range(n):
        data = canonical_json(payload(k % STREAMS, k))
        fields = encode_fields(f"vm-{k % STREAMS}", "vm.bench", "bench", None, None, None)
        prev = link_hash(prev, k + 1, k // STREAMS + 1, 1_700_000_000_000_000 + k, 1, fields, data)
    return (time.process_time() - t0) / n * 1e6


def run_threads(fn: Callable[[int], None], k: int) -> None:
    """fn(0) here if k == 1, else fn(0..k-1) on k threads; the first exception of any thread is raised."""
    if k == 1:
        fn(0)
        return
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------- naive
def _naive_conn(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for pragma in tuning(PAGE_SIZE):
        conn.execute(pragma)
    return conn


def naive(path: Path, n: int, appenders: int) -> float:
    setup = _naive_conn(path)
    log_id = migrate(setup)
    setup.close()
    genesis = genesis_hash(log_id)
    per = max(1, n // appenders)

    def appender(i: int) -> None:
        conn = _naive_conn(path)
        stream = f"vm-{i}"
        try:
            for k in range(per):
                data = canonical_json(payload(i, k))
                fields = encode_fields(stream, "vm.bench", "bench", None, None, None)
                conn.execute("BEGIN IMMEDIATE")
                head = conn.execute("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
                position, prev = (head[0], head[1]) if head else (0, genesis)
                v = conn.execute(
                    "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = ?", (stream,)
                ).fetchone()[0]
                ts = time.time_ns() // 1000
                h = link_hash(prev, position + 1, v + 1, ts, 1, fields, data)
                conn.execute(
                    INSERT_EVENT,
                    (position + 1, stream, v + 1, "vm.bench", 1, ts, "bench", None, None, None, data, prev, h),
                )
                conn.execute("COMMIT")
        finally:
            conn.close()

    t0 = time.perf_counter()
    run_threads(appender, appenders)
    return per * appenders / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- moldd
async def moldd(opener: StoreOpener, directory: Path, run: int, n: int, appenders: int) -> float:
    store = await opener(directory, run)
    per = max(1, n // appenders)

    async def appender(i: int) -> None:
        stream = f"vm-{i}"
        append = store.async_append
        for k in range(per):
            await append(stream, [NewEvent("vm.bench", payload(i, k), actor="bench")])

    t0 = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(appenders)))
    elapsed = time.perf_counter() - t0
    await store.async_close()
    return per * appenders / elapsed


LOOP = "uvloop"
"""The event loop moldd's rows run on (``--loop``): the daemon's default (``[daemon] event_loop``) unless told."""


def _run_moldd(opener: StoreOpener, directory: Path, run: int, n: int, appenders: int) -> float:
    if LOOP == "uvloop":
        import uvloop

        return uvloop.run(moldd(opener, directory, run, n, appenders))
    return asyncio.run(moldd(opener, directory, run, n, appenders))


# ---------------------------------------------------------------------------------------------- postgres
class PostgresSide:
    """``--store postgres``: moldd's group-commit writer on PostgreSQL too, beside SQLite in every run (issue 14).
    A throw-away server (moldlab.testing.pgserver: initdb + pg_ctl, Unix socket, ``fsync=on``,
    ``synchronous_commit=on``: every COMMIT is flushed before its appenders are answered); a fresh schema per run.
    Its bytes/event are this process's only (the server's WAL is written by other processes)."""

    def __init__(self) -> None:
        from moldlab.testing.pgserver import PgServer

        self.server = PgServer(fsync=True).start()
        atexit.register(self.server.stop)  # also when a run fails (stop is idempotent)
        self.durability = (
            f"synchronous_commit={self.server.psql('SHOW synchronous_commit')}, fsync={self.server.psql('SHOW fsync')}"
        )

    async def open(self, directory: Path, run: int) -> EventStore:
        from events.postgres import PostgresEventStore

        return await PostgresEventStore.async_open(self.server.dsn(), schema=f"bench{run}")

    def close(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------------------------------------- peer
def peer_available() -> bool:
    try:
        import eventsourcing  # noqa: F401
    except ImportError:
        return False
    return True


_Thing: Any = None


def peer(path: Path, n: int, appenders: int) -> float:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.sqlite import SQLiteConnectionPool

    original = SQLiteConnectionPool._create_connection
    if not getattr(original, "_bench_full", False):

        def create_full(self: Any) -> Any:
            conn = original(self)
            conn._sqlite_conn.execute("PRAGMA synchronous = FULL")  # the same durability as the others
            return conn

        create_full._bench_full = True  # type: ignore[attr-defined]
        SQLiteConnectionPool._create_connection = create_full  # type: ignore[method-assign]

    global _Thing
    if _Thing is None:

        class Thing(Aggregate):
            @event("Benched")
            def bench(self, vm: str, k: int, host: str, state: str) -> None:
                pass

        _Thing = Thing
    Thing = _Thing  # type: ignore[misc]
    app: Application[Any] = Application(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path), "SQLITE_LOCK_TIMEOUT": "60"},
    )
    per = max(1, n // appenders)

    def appender(i: int) -> None:
        thing = Thing()
        app.save(thing)
        for k in range(per):
            thing.bench(**payload(i, k))
            app.save(thing)

    t0 = time.perf_counter()
    run_threads(appender, appenders)
    elapsed = time.perf_counter() - t0
    app.close()
    return per * appenders / elapsed  # the creation events are not counted (one per appender)


# ---------------------------------------------------------------------------------------------- driver
def measured(fn: Callable[[], float], n: int) -> tuple[float, float, float]:
    """(events/s, bytes handed to write() per event, µs of this process's CPU per event) of one run."""
    io0 = proc_io()["wchar"]
    cpu0 = cpu_s()
    eps = fn()
    return eps, (proc_io()["wchar"] - io0) / n, (cpu_s() - cpu0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000, help="events per concurrent moldd run")
    ap.add_argument("--seq-events", type=int, default=None, help="events per sequential run (default N/10)")
    ap.add_argument("--naive-events", type=int, default=None, help="events per naive/peer run (default N/10)")
    ap.add_argument("--appenders", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", choices=sorted({*STORES, "postgres"}), default="sqlite")
    ap.add_argument("--dir", type=Path, default=None, help="directory for the logs (default: a temporary one)")
    ap.add_argument("--skip-peer", action="store_true", help="do not run the eventsourcing library")
    ap.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="moldd's event loop (default: uvloop, the daemon's default `[daemon] event_loop`)",
    )  # fmt: skip
    args = ap.parse_args()
    global LOOP
    LOOP = args.loop
    header("bench/append.py")
    n = args.events
    n_seq = args.seq_events or max(500, n // 10)
    n_naive = args.naive_events or max(500, n // 10)
    c = args.appenders
    pg_side = PostgresSide() if args.store == "postgres" and "postgres" not in STORES else None
    opener = STORES["sqlite"] if pg_side is not None else STORES[args.store]
    results: dict[str, list[float]] = {}

    def record(key: str, eps: float, bpe: float, cpu_us: float) -> None:
        results.setdefault(f"{key}_eps", []).append(eps)
        results.setdefault(f"{key}_bytes_per_event", []).append(bpe)
        results.setdefault(f"{key}_cpu_us_per_event", []).append(cpu_us)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_s:
        tmp = Path(tmp_s)
        print(f"logs in {tmp} (store {args.store}); {n} events per concurrent run, {n_seq} sequential, "
              f"{n_naive} naive/peer; moldd on the {args.loop} event loop", flush=True)  # fmt: skip
        results["floor_fsync_per_s"] = [fsync_per_s(tmp) for _ in range(args.runs)]
        results["floor_cpu_us_per_event"] = [cpu_us_per_event() for _ in range(args.runs)]
        print(f"floor: fsync/s of the disk:              {fmt(results['floor_fsync_per_s'])}")
        print(f"floor: CPU per event, encode + SHA-256:  {fmt(results['floor_cpu_us_per_event'], ' µs', 1)}")
        with_peer = not args.skip_peer and peer_available()
        for run in range(args.runs):
            for mode, k in (("seq", 1), ("conc", c)):
                m = n if mode == "conc" else n_seq
                tag = f"{mode}-{run}"
                record(f"naive_{mode}", *measured(partial(naive, tmp / f"naive-{tag}.db", n_naive, k), n_naive))
                slot = run * 2 + (mode == "conc")
                record(f"moldd_{mode}", *measured(partial(_run_moldd, opener, tmp, slot, m, k), m))
                if pg_side is not None:
                    record(f"moldd_pg_{mode}", *measured(partial(_run_moldd, pg_side.open, tmp, slot, m, k), m))
                if with_peer:
                    record(f"peer_{mode}", *measured(partial(peer, tmp / f"peer-{tag}.db", n_naive, k), n_naive))
            for f in tmp.iterdir():
                f.unlink()
            print(f"  run {run + 1}/{args.runs} done", flush=True)
        rows = [("naive", "naive: sqlite3, 1 txn+fsync/event"), ("moldd", f"moldd {args.store} group commit")]
        if pg_side is not None:
            pg_side.close()
            rows = [rows[0], ("moldd", "moldd sqlite group commit"), ("moldd_pg", "moldd postgres group commit")]
            print(f"postgres: {pg_side.durability}; its B/event are the client's only")
        if with_peer:
            rows.append(("peer", "eventsourcing 1 save/event"))
        elif not args.skip_peer:
            print("(eventsourcing not installed: pip install .[bench] to run the peer)")
        for key, label in rows:
            for mode, k in (("seq", 1), ("conc", c)):
                r = results[f"{key}_{mode}_eps"]
                b = results[f"{key}_{mode}_bytes_per_event"]
                u = results[f"{key}_{mode}_cpu_us_per_event"]
                print(f"{label:38s} {k:3d} appender(s): {fmt(r, ' ev/s')}; {fmt(b, ' B/event')}; "
                      f"CPU {fmt(u, ' µs/event')}")  # fmt: skip
        best = [max(a, b) for a, b in zip(results["naive_seq_eps"], results["naive_conc_eps"], strict=True)]
        results["ratio_conc_vs_best_naive"] = [m / b for m, b in zip(results["moldd_conc_eps"], best, strict=True)]
        print(f"ratio moldd {c} appenders / naive's best mode: {fmt(results['ratio_conc_vs_best_naive'], 'x', 2)}")
        for mode in ("seq", "conc"):
            ratio = [m / b for m, b in zip(results[f"moldd_{mode}_eps"], results[f"naive_{mode}_eps"], strict=True)]
            results[f"ratio_naive_{mode}"] = ratio
            print(f"ratio moldd / naive, {mode}: {fmt(ratio, 'x', 2)}")
            if pg_side is not None:
                pr = [p / q for p, q in zip(results[f"moldd_pg_{mode}_eps"], results[f"moldd_{mode}_eps"], strict=True)]
                results[f"ratio_pg_to_sqlite_{mode}"] = pr
                print(f"ratio moldd postgres / moldd sqlite, {mode}: {fmt(pr, 'x', 2)}")
            if with_peer:
                pr = [m / b for m, b in zip(results[f"moldd_{mode}_eps"], results[f"peer_{mode}_eps"], strict=True)]
                results[f"ratio_peer_{mode}"] = pr
                print(f"ratio moldd / eventsourcing, {mode}: {fmt(pr, 'x', 2)}")
    footer()
    print(json.dumps(medians(results)))


if __name__ == "__main__":
    main()
