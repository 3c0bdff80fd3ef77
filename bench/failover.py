"""Management-node failover on real PostgreSQL, real moldd processes, real libvirtd hosts and QEMU guests.

    python bench/failover.py [--runs 3] [--lease 4 --heartbeat 0.5 --fence-after 2.5] [--keep DIR]

Each run: a fresh log (schema) on one throw-away PostgreSQL server (fsync=on), two moldd nodes (n1 leads, n2
is a warm standby), one HA VM deployed through n1. Then, at the same moment, n1 is killed with SIGKILL and the
VM's QEMU with SIGKILL, and we measure on n2:
* death_to_first_write_s: → n2 accepts a write (createInstanceGroup, retried until not refused);
* death_to_vm_running_s: → the VM runs again (ha.restart.succeeded in the log, new QEMU);
* death_to_guest_ready_s: → the restarted guest prints its ready line on the serial console (TCG boot);
and, in a second phase, the leader (now n2, with n1 restarted as standby) is SIGSTOPped:
* pause_to_first_write_s: SIGSTOP → n1 accepts a write (bounded below by the lease: PostgreSQL ends the
  paused leader's session after lease_s).
Phases (from the log's recorded_at, relative to the kill / the SIGSTOP): death → daemon.leader_elected, →
the first ha.* event of the VM (hosts resynced, HA started, the VM found stopped), → the restart's start
(ha.restart.started), → ha.restart.succeeded (libvirt's virDomainCreate returned: QEMU runs; under TCG on a
busy machine this is most of the figure); pause → leader_elected (≈ lease_s less the time since the last
answered heartbeat), → the first write. FAILOVER_TRACE=1 prints every event after the kill.
Figures: min/median/max over --runs, and the load. The last line is one JSON object. Peers: a Kubernetes lease ≈ 15 s,
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

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moldd.config import ClusterConfig
from moldlab import GUEST_READY_MARKER, Lab, build_guest
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


async def guest_ready_again(console: Path, offset: int) -> float:
    """The restarted guest prints GUEST_READY_MARKER on its serial console (kernel up, acpid running)."""
    while True:
        try:
            data = console.read_bytes()
        except FileNotFoundError:
            data = b""
        tail = data[offset:] if len(data) >= offset else data  # a new QEMU may have truncated the log
        if GUEST_READY_MARKER.encode() in tail:
            return time.monotonic()
        await asyncio.sleep(0.05)


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


async def kill_phases(pg: PgServer, schema: str, t0_wall_us: int, vm: str) -> dict[str, float]:
    """Where the time from the leader's death to the HA VM running again went, from the log's timestamps."""
    conn = await asyncpg.connect(pg.dsn())
    try:
        rows = await conn.fetch(
            f'SELECT event_type, stream_id, recorded_at FROM "{schema}".events WHERE recorded_at >= $1 '
            "ORDER BY position",
            t0_wall_us,
        )
    finally:
        await conn.close()
    if os.environ.get("FAILOVER_TRACE"):
        for r in rows:
            print(f"  +{(r[2] - t0_wall_us) / 1e6:7.3f} {r[1]:24} {r[0]}", flush=True)

    def at(pred: Any) -> float:
        return next(((r[2] - t0_wall_us) / 1e6 for r in rows if pred(r)), float("nan"))

    elected = at(lambda r: r[0] == "daemon.leader_elected")
    ha_first = at(lambda r: r[1] == f"vm-{vm}" and r[0].startswith("ha."))
    start_req = at(lambda r: r[1] == f"vm-{vm}" and r[0] in ("ha.restart.started", "vm.start.requested"))
    succeeded = at(lambda r: r[1] == f"vm-{vm}" and r[0] == "ha.restart.succeeded")
    return {
        "phase_death_to_elected_s": elected,
        "phase_elected_to_ha_decision_s": ha_first - elected,
        "phase_ha_decision_to_start_s": start_req - ha_first,
        "phase_start_to_running_s": succeeded - start_req,
    }


async def elected_after(pg: PgServer, schema: str, t_wall_us: int) -> float:
    conn = await asyncpg.connect(pg.dsn())
    try:
        at = await conn.fetchval(
            f'SELECT min(recorded_at) FROM "{schema}".events WHERE recorded_at >= $1 '
            "AND event_type = 'daemon.leader_elected'",
            t_wall_us,
        )
    finally:
        await conn.close()
    return float("nan") if at is None else (at - t_wall_us) / 1e6


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
        console = Path(vm["root_disk"]["path"]).parent / "console.log"
        await asyncio.wait_for(guest_ready_again(console, 0), 300)  # the first boot is over
        offset = console.stat().st_size
        t0 = time.monotonic()
        t0_wall_us = int(time.time() * 1e6)
        os.kill(n1.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        write_at, running_at, ready_at = await asyncio.wait_for(
            asyncio.gather(
                first_write(n2, "after-kill"), vm_restarted(n2, vm["name"]), guest_ready_again(console, offset)
            ),
            300,
        )
        n1.proc.wait(10)  # type: ignore[union-attr]
        phases = await kill_phases(pg, f"failover{i}", t0_wall_us, vm["name"])
        n1.start()
        await n1.async_wait(role="standby", leader="n2", timeout=120)
        await n2.async_wait(role="leader", acting=True, timeout=120)
        t1 = time.monotonic()
        t1_wall_us = int(time.time() * 1e6)
        n2.freeze()
        paused_write_at = await asyncio.wait_for(first_write(n1, "after-pause"), 180)
        n2.thaw()
        await n2.async_wait(role="standby", leader="n1", timeout=120)
        paused_elected = await elected_after(pg, f"failover{i}", t1_wall_us)
        return {
            "death_to_first_write_s": write_at - t0,
            "death_to_vm_running_s": running_at - t0,
            "death_to_guest_ready_s": ready_at - t0,
            "pause_to_first_write_s": paused_write_at - t1,
        } | phases | {
            "phase_running_to_guest_ready_s": ready_at - running_at,
            "phase_pause_to_elected_s": paused_elected,
            "phase_pause_elected_to_write_s": paused_write_at - t1 - paused_elected,
        }
    finally:
        n1.stop()
        n2.stop()
        for host in lab.hosts:  # no guest of this run survives into the next
            host.fence()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    defaults = ClusterConfig()  # the shipped timings unless told otherwise
    ap.add_argument("--lease", type=float, default=defaults.lease_s)
    ap.add_argument("--heartbeat", type=float, default=defaults.heartbeat_s)
    ap.add_argument("--fence-after", type=float, default=defaults.fence_after_s)
    ap.add_argument("--keep", type=Path, default=None, help="keep the nodes' logs and configs in this directory")
    args = ap.parse_args()
    timings = {"lease_s": args.lease, "heartbeat_s": args.heartbeat, "fence_after_s": args.fence_after}
    guest = build_guest(CACHE)
    load_before = os.getloadavg()[0]
    print(f"load {load_before:.1f}; timings {timings}", flush=True)
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp, PgServer(fsync=True) as pg:
        root = Path(tmp) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        with Lab(root / "lab", n_hosts=2, qemu_caps_cache=CACHE / "qemu-caps") as lab:
            for i in range(args.runs):
                r = await one_run(lab, guest, pg, root, i, timings)
                runs.append(r)
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    out: dict[str, Any] = {
        "runs": len(runs), "timings": timings, "load_before": load_before, "load": os.getloadavg()[0],
    }  # fmt: skip
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] == r[key]]  # NaN: the phase's event was not found
        if not values:
            continue
        out[key] = {
            "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
        }
    print("figure                              min    median    max")
    for key, v in out.items():
        if isinstance(v, dict) and "median" in v:
            print(f"{key:34} {v['min']:6.2f} {v['median']:8.2f} {v['max']:6.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
