"""SIGKILL the appending process at random moments: every acknowledged append survives, nothing is
half-written, and the log verifies."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from events import verify

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ROUNDS = 18


async def one_round(db: Path, round_no: int, rng: random.Random) -> list[tuple[str, int, int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "fault_appender.py"), str(db), str(round_no),
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None
    acks: list[tuple[str, int, int]] = []

    async def read() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            if line.endswith(b"\n") and line.startswith(b"ACK "):
                _, cid, first, last = line.decode().split()
                acks.append((cid, int(first), int(last)))

    reader = asyncio.create_task(read())
    # wait for the first ack so the kill lands while appends are in flight, then a random moment later
    for _ in range(400):
        if acks:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await reader
    return acks


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_append(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    rng = random.Random(os.getpid())
    all_acks: list[tuple[str, int, int]] = []
    for round_no in range(ROUNDS):
        acks = await one_round(db, round_no, rng)
        assert acks, "the child acknowledged nothing"
        all_acks.extend(acks)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            assert conn.execute("SELECT count(*) FROM commands").fetchone()[0] == 0  # ids live in the chain only
            per_command = {
                cid: (first, last, n)
                for cid, first, last, n in conn.execute(
                    "SELECT command_id, min(position), max(position), count(*) FROM events GROUP BY command_id"
                )
            }
            n_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            conn.close()
        commands = {cid: (first, last) for cid, (first, last, _) in per_command.items()}
        for cid, first, last in all_acks:  # every acknowledged append is present, where it was acknowledged
            assert commands.get(cid) == (first, last), cid
        for cid, (first, last) in commands.items():  # nothing half-written: each command has all its events
            assert per_command[cid] == (first, last, 3) and last - first == 2, cid
        assert set(per_command) == set(commands)
        assert n_events == 3 * len(commands)
        report = verify(db)
        assert report.exit_code == 0, report.render()
        assert report.last_position == n_events
