"""``GET /v1/events`` followers hold bounded memory: 200 followers replaying a long log from position 1 raise the
daemon's RSS by a bounded amount, which returns near its baseline when they leave; the correlation filter reads
through an index, not the whole log (real daemon process, real socket, real lab hosts)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from events import NewEvent, SQLiteEventStore
from moldlab.testing.harness import Client

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

N_EVENTS = 3_000
FOLLOWERS = 200
NEEDLE_EVERY = 300


async def prefill(db: Path) -> None:
    store = await SQLiteEventStore.async_open(db)
    try:
        filler = "x" * 400
        for start in range(0, N_EVENTS, 500):
            events = [
                NewEvent(
                    "test.filler",
                    {"i": i, "text": filler},
                    correlation_id="needle" if i % NEEDLE_EVERY == 0 else None,
                )
                for i in range(start, start + 500)
            ]
            await store.async_append(f"filler-{start}", events)
    finally:
        await store.async_close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def follow(socket_path: str, query: str, until: int, *, collect: bool = False) -> list[dict[str, Any]]:
    """Read one event stream until an entry at position ``until`` or later, then leave. Only the last entry of
    each read is decoded unless ``collect`` (200 followers decoding every line would measure the test client)."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(f"GET /v1/events?{query} HTTP/1.1\r\nHost: moldd\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    seen: list[dict[str, Any]] = []
    buffer = b""
    count = 0
    while True:
        chunk = await reader.read(262144)
        assert chunk, "the stream ended early"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        entries = [line for line in lines if line.startswith(b"{") and b'"position":' in line]
        count += len(entries)
        if not entries:
            continue
        if collect:
            seen += [json.loads(line) for line in entries]
        last = json.loads(entries[-1])
        if last["position"] >= until:
            writer.close()
            return seen if collect else [{"count": count}]


@pytest.mark.timeout(900)
async def test_followers_hold_bounded_memory_and_give_it_back(make_config: Any, tmp_path: Path) -> None:
    config = make_config()
    await prefill(config.database)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "moldd.daemon",
        "--config",
        str(config.path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with Client(config.socket) as client:
            for _ in range(600):
                try:
                    head = (await client.call("listEvents", limit=1))["position"]
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the daemon did not come up")
            assert head >= N_EVENTS
            # warm up: one follower, so lazily built things exist before the baseline is taken
            await follow(str(config.socket), "from=1", N_EVENTS)
            baseline = rss_kib(proc.pid)
            print(f"baseline {baseline // 1024} MiB", flush=True)
            peak = baseline
            followers = [
                asyncio.ensure_future(follow(str(config.socket), "from=1", N_EVENTS)) for _ in range(FOLLOWERS)
            ]
            while not all(f.done() for f in followers):
                peak = max(peak, rss_kib(proc.pid))
                await asyncio.wait(followers, timeout=0.05)
            results = [f.result() for f in followers]
            assert all(r[0]["count"] >= N_EVENTS for r in results)
            # the last follower's departure gives memory back; let the daemon get there
            after = rss_kib(proc.pid)
            for _ in range(400):  # the daemon trims its heap when the last stream has ended
                await client.call("listHosts")
                after = rss_kib(proc.pid)
                if after - baseline < 40 * 1024:
                    break
                await asyncio.sleep(0.05)
            print(f"RSS baseline {baseline // 1024} MiB, peak {peak // 1024} MiB, after {after // 1024} MiB")
            assert peak - baseline < 150 * 1024, (baseline, peak)
            assert after - baseline < 40 * 1024, (baseline, peak, after)
            # the correlation filter: exactly the matching entries, from the index
            needles = await follow(
                str(config.socket), "from=1&correlation=needle", N_EVENTS - NEEDLE_EVERY + 1, collect=True
            )
            assert [e["payload"]["i"] for e in needles] == list(range(0, N_EVENTS, NEEDLE_EVERY))
            # the stream filter: one stream's entries from a position on, through the stream's index
            one = await follow(str(config.socket), "from=600&stream=filler-500", 1000, collect=True)
            assert [e["position"] for e in one] == list(range(600, 1001))
            assert {e["stream_id"] for e in one} == {"filler-500"}
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def test_correlation_reads_use_the_index(tmp_path: Path) -> None:
    async def run() -> list[Any]:
        store = await SQLiteEventStore.async_open(tmp_path / "log.db")
        try:
            await store.async_append("s", [NewEvent("t", {"i": i}, correlation_id=f"c{i % 7}") for i in range(50)])
            got = await store.async_read_correlated("c3", 10, limit=3)
            generic = await super(SQLiteEventStore, store).async_read_correlated("c3", 10, limit=3)
            assert [e.position for e in got] == [e.position for e in generic]
            return [e.position for e in got]
        finally:
            await store.async_close()

    positions = asyncio.run(run())
    assert len(positions) == 3 and positions[0] >= 10
    conn = sqlite3.connect(tmp_path / "log.db")
    plan = " ".join(
        str(row[-1])
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT position FROM events WHERE (correlation_id = ? OR command_id = ?) "
            "AND position >= ? ORDER BY position LIMIT ?",
            ("c3", "c3", 1, 10),
        )
    )
    conn.close()
    assert "events_correlation" in plan and "events_command" in plan, plan
