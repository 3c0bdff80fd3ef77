"""The benchmarks the README quotes still run: each one, at a tiny size, exits 0 and ends with its JSON line of
medians (the figures themselves are never asserted: speed goals live in bench/, not in tests). A benchmark broken
by a change elsewhere (an import, a helper's signature) fails here instead of on the next person who reruns a
README figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SMALL = {
    "append": ["--events", "300", "--seq-events", "30", "--naive-events", "30", "--runs", "1", "--skip-peer"],
    "replay": ["--events", "3000", "--vms", "100", "--verify-events", "3000", "--runs", "1", "--breakdown"],
    "scale": ["--vms", "300", "--runs", "1", "--list-calls", "5", "--all-calls", "1"],
    "pg_profile": ["--events", "256", "--runs", "1", "--no-fsync-off", "--command-ids"],
    "api": ["--hosts", "test", "--vms", "100", "--duration", "0.3", "--runs", "1", "--rates", "50", "--reads", "one"],
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_benchmark_runs_and_prints_its_medians(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    if name == "pg_profile":  # its PostgreSQL runs as an unprivileged user, who cannot enter pytest's tmp_path
        env.pop("TMPDIR")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *SMALL[name]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    medians = json.loads(last)
    assert isinstance(medians, dict) and medians, last
