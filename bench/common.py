"""Shared helpers of the benchmarks: repeated runs summarised as min/median/max, the machine's load, process
figures from /proc (CPU, RSS, bytes written)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load() -> str:
    """The 1/5/15-minute load averages and the CPU count, as printed at the start and end of every bench."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def header(name: str) -> None:
    print(f"# {name} — python {platform.python_version()}, {platform.machine()}, {load()}", flush=True)


def footer() -> None:
    print(f"# end: {load()}", flush=True)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(values: list[float], unit: str = "", digits: int = 0) -> str:
    s = summary(values)
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['min'])} / {f.format(s['median'])} / {f.format(s['max'])}{unit} (min/median/max of {len(values)})"


def repeat(runs: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(runs)]


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/io: ``wchar`` = bytes handed to write()/pwrite() (all threads), ``write_bytes`` = bytes sent to
    the block device (0 on tmpfs)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def medians(results: dict[str, list[float]]) -> dict[str, Any]:
    return {k: round(statistics.median(v), 3) for k, v in results.items() if v}
