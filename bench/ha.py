"""HA timings on real libvirtd hosts and real QEMU guests (one machine, TCG guests).

    python bench/ha.py [--crashes 5]

Measures, with the real daemon in-process and the lab's libvirtd hosts:
* vm_crash_to_restart_s: qemu SIGKILLed → HA has recorded its restart decision and started the domain
  (``ha.restart.started``), median over --crashes runs; vm_crash_to_running_s: → ``ha.restart.succeeded``.
* out_of_band_to_state_s: ``virsh destroy`` behind moldd's back → the VM shows Stopped in the API.
* host_failure_to_running_elsewhere_s: the VM's libvirtd and guests SIGKILLed (power loss) → the VM runs on the
  other host, fencing included; host_frozen_to_running_elsewhere_s: libvirtd SIGSTOPped (partition) → same.
Prints the figures, then as the LAST line one JSON object. Peers: Proxmox ~120 s host failover, Masakari ≥ 240 s.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moldd.lab import Lab, build_guest
from moldd.testing.harness import Client, running_daemon, write_config

CACHE = Path(__file__).resolve().parent.parent / ".lab" / "cache"


def qemu_pid(host: Any, domain: str) -> int:
    return int((Path(host.dir) / "run" / "qemu" / f"{domain}.pid").read_text().strip())


async def event_time(client: Client, vm: str, type: str, after: int, timeout: float = 60) -> tuple[float, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in await client.events(vm):
            if ev["event_type"] == type and ev["position"] > after:
                return datetime.fromisoformat(ev["recorded_at"]).timestamp(), ev["position"]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{type} did not happen for {vm}")


async def last_position(client: Client, vm: str) -> int:
    return int((await client.events(vm))[-1]["position"])


async def bench(args: argparse.Namespace) -> dict[str, float]:
    guest = build_guest(CACHE)
    root = Path(tempfile.mkdtemp(prefix="moldd-bench-ha-"))
    out: dict[str, float] = {}
    with Lab(root / "lab", n_hosts=2, qemu_caps_cache=CACHE / "qemu-caps") as lab:
        config = write_config(root / "moldd", lab.hosts, guest, ha={"max_restarts": 100, "window_s": 1.0})
        async with running_daemon(config), Client(config.socket) as client:
            job = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True, host="host0")
            name = job["vm"]
            vm = await client.vm(name)
            host0 = lab.hosts[0]
            decided, running = [], []
            for i in range(args.crashes):
                await client.wait_vm(name, state="Running")
                await asyncio.sleep(1.2)  # past the 1 s restart window: every crash is a first restart
                pos = await last_position(client, name)
                t0 = time.time()
                os.kill(qemu_pid(host0, vm["internal_name"]), signal.SIGKILL)
                t_started, _ = await event_time(client, name, "ha.restart.started", pos)
                t_running, _ = await event_time(client, name, "ha.restart.succeeded", pos)
                decided.append(t_started - t0)
                running.append(t_running - t0)
                print(f"crash {i + 1}: restart started after {decided[-1]:.3f} s, running after {running[-1]:.3f} s")
            out["vm_crash_to_restart_s"] = round(statistics.median(decided), 3)
            out["vm_crash_to_running_s"] = round(statistics.median(running), 3)

            # out-of-band destroy → state visible (HA disabled for this one)
            plain = (await client.job("deployVirtualMachine", template="tiny", offering="small", host="host1"))["vm"]
            pvm = await client.vm(plain)
            conn = libvirt.open(lab.hosts[1].uri)
            t0 = time.monotonic()
            conn.lookupByName(pvm["internal_name"]).destroy()
            conn.close()
            await client.wait_vm(plain, timeout=10, state="Stopped")
            out["out_of_band_to_state_s"] = round(time.monotonic() - t0, 3)
            print(f"out-of-band destroy visible after {out['out_of_band_to_state_s']:.3f} s")

            # host power loss
            await client.wait_vm(name, state="Running", host="host0")
            t0 = time.monotonic()
            host0.kill()
            await client.wait_vm(name, timeout=90, state="Running", host="host1")
            out["host_failure_to_running_elsewhere_s"] = round(time.monotonic() - t0, 3)
            print(f"host killed → running on host1 after {out['host_failure_to_running_elsewhere_s']:.2f} s")

            # move it back, then freeze host1 (partition: guests keep running until fenced)
            host0.restart()
            await client.wait_host("host0", timeout=30, health="Up", link="connected")
            t0 = time.monotonic()
            lab.hosts[1].freeze()
            await client.wait_vm(name, timeout=90, state="Running", host="host0")
            out["host_frozen_to_running_elsewhere_s"] = round(time.monotonic() - t0, 3)
            print(f"host frozen → running on host0 after {out['host_frozen_to_running_elsewhere_s']:.2f} s")
            lab.hosts[1].thaw()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crashes", type=int, default=5)
    figures = asyncio.run(bench(parser.parse_args()))
    print("peers: Proxmox host failover ~120 s; Masakari host failure >= 240 s; KubeVirt crash back-off >= 10 s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
