"""Management-node failover on real PostgreSQL, real moldd processes, real libvirtd hosts and QEMU guests.

    python bench/failover.py [--runs 3] [--lease 5 --heartbeat 1 --fence-after 3]

Each run: a fresh log (schema) on one throw-away PostgreSQL server (fsync=on), two moldd nodes (n1 leads, n2
is a warm standby), one HA VM deployed through n1. Then, at the same moment, n1 is killed with SIGKILL and the
VM's QEMU with SIGKILL, and we measure on n2:
* death_to_first_write_s: → n2 accepts a write (createInstanceGroup, retried until not refused);
* death_to_vm_running_s: → the VM runs again (ha.restart.succeeded in the log, new QEMU);
and, in a second phase, the leader (now n2, with n1 restarted as standby) is SIGSTOPped:
* pause_to_first_write_s: SIGSTOP → n1 accepts a write (bounded below by the lease: PostgreSQL ends the
  paused leader's session after lease_s).
Figures: min/median/max over --runs. The last line is one JSON object. Peers: a Kubernetes lease ≈ 15 s,
Patroni ≈ 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moldlab import Lab, build_guest
from moldlab.testing.cluster import Node, make_nodes
from moldlab.testing.harness import CommandFailed
from moldlab.testing.pgserver import PgServer

CACHE = Path(os.environ.get("MOLDD_LAB_CACHE") or Path(__file__).resolve().parent.parent / ".lab" / "cache")


def qemu_pid(lab: Lab, host: str, domain: str) -> int:
    h = next(h for h in lab.hosts if h.name == host)
    return int((Path(h.dir) / "run" / "qemu" / f"{domain}.pid").read_text().strip())


async def first_write(node: Node, name: str) -> float:
    async with node.client() as c:
        while True:
            try:
                await c.call("createInstanceGroup", name=name)
                return time.monotonic()
            except CommandFailed as exc:
                if exc.code != "not_leader":
                    raise
            except OSError:
                pass
            await asyncio.sleep(0.01)


async def vm_restarted(node: Node, vm: str) -> float:
    async with node.client() as c:
        while True:
            try:
                events = await c.events(vm, type="ha.restart.succeeded")
                if events:
                    return time.monotonic()
            except CommandFailed:
                pass
            await asyncio.sleep(0.02)


async def one_run(
    lab: Lab, guest: Any, pg: PgServer, root: Path, i: int, timings: dict[str, float]
) -> dict[str, float]:
    n1, n2 = make_nodes(root / f"run{i}", ["n1", "n2"], lab.hosts, guest, pg.dsn(), f"failover{i}", timings)
    try:
        n1.start()
        await n1.async_wait(role="leader", acting=True, timeout=120)
        n2.start()
        await n2.async_wait(role="standby", leader="n1", timeout=120)
        async with n1.client() as c:
            for _attempt in range(3):  # a very busy machine may time a TCG guest's start out: try again
                job = await c.job("deployVirtualMachine", template="tiny", offering="small", ha=True, timeout=180)
                if job["status"] == "succeeded":
                    break
            assert job["status"] == "succeeded", job
            vm = await c.vm(job["vm"])
        pid = qemu_pid(lab, vm["host"], vm["internal_name"])
        t0 = time.monotonic()
        os.kill(n1.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        write_at, running_at = await asyncio.wait_for(
            asyncio.gather(first_write(n2, "after-kill"), vm_restarted(n2, vm["name"])), 180
        )
        n1.proc.wait(10)  # type: ignore[union-attr]
        n1.start()
        await n1.async_wait(role="standby", leader="n2", timeout=120)
        await n2.async_wait(role="leader", acting=True, timeout=120)
        t1 = time.monotonic()
        n2.freeze()
        paused_write_at = await asyncio.wait_for(first_write(n1, "after-pause"), 180)
        n2.thaw()
        await n2.async_wait(role="standby", leader="n1", timeout=120)
        return {
            "death_to_first_write_s": write_at - t0,
            "death_to_vm_running_s": running_at - t0,
            "pause_to_first_write_s": paused_write_at - t1,
        }
    finally:
        n1.stop()
        n2.stop()
        for host in lab.hosts:  # no guest of this run survives into the next
            host.fence()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lease", type=float, default=5.0)
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--fence-after", type=float, default=3.0)
    args = ap.parse_args()
    timings = {"lease_s": args.lease, "heartbeat_s": args.heartbeat, "fence_after_s": args.fence_after}
    guest = build_guest(CACHE)
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp, PgServer(fsync=True) as pg:
        root = Path(tmp)
        with Lab(root / "lab", n_hosts=2, qemu_caps_cache=CACHE / "qemu-caps") as lab:
            for i in range(args.runs):
                r = await one_run(lab, guest, pg, root, i, timings)
                runs.append(r)
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    out: dict[str, Any] = {"runs": len(runs), "timings": timings, "load": os.getloadavg()[0]}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {
            "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
