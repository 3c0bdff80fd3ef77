"""Several real moldd processes on one PostgreSQL log and the lab hosts (failover tests and bench/failover.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from moldlab.testing.harness import Client, write_config

REPO = Path(__file__).resolve().parents[2]
FAST = {"lease_s": 2.0, "heartbeat_s": 0.3, "fence_after_s": 1.2}


class Node:
    """One moldd process (`python -m moldd.daemon`), its config and its socket."""

    def __init__(self, name: str, root: Path, config_path: Path, socket: Path) -> None:
        self.name = name
        self.root = root
        self.config_path = config_path
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moldd.daemon", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (the node's power is cut)."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def async_health(self) -> dict[str, Any] | None:
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket))) as s:
                async with s.get("http://moldd/v1/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    data: dict[str, Any] = await r.json()
                    return data
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def async_wait(self, timeout: float = 60.0, **want: Any) -> dict[str, Any]:
        """Wait until the node's health has the given fields (e.g. role="leader", acting=True)."""
        deadline = time.monotonic() + timeout
        health: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"node {self.name} exited: {self.log.read_text()[-3000:]}")
            health = await self.async_health()
            if health is not None and all(health.get(k) == v for k, v in want.items()):
                return health
            await asyncio.sleep(0.05)
        raise TimeoutError(f"node {self.name}: wanted {want}, health is {json.dumps(health)[:800]}")

    def client(self) -> Client:
        return Client(self.socket)


def make_nodes(
    root: Path,
    names: list[str],
    hosts: list[Any],
    guest: Any,
    dsn: str,
    schema: str,
    timings: dict[str, float] | None = None,
    ha: dict[str, Any] | None = None,
    sections: Any = None,
) -> list[Node]:
    """Configs for `names`, all on the log `schema` of `dsn`, the same hosts and the same disk directory.
    `sections`: more TOML sections, the same for every node or `sections(name, node_root)` per node."""
    nodes = []
    for name in names:
        nroot = root / name
        cfg = write_config(
            nroot,
            hosts,
            guest,
            daemon={
                "database": dsn,
                "socket": str(root / f"{name}.sock"),
                "storage_dir": str(root / "disks"),
            },
            cluster={"node": name, "schema": schema, **(timings or FAST)},
            ha=ha,
            sections=sections(name, nroot) if callable(sections) else sections,
        )
        nodes.append(Node(name, root, cfg.path, root / f"{name}.sock"))
    return nodes
