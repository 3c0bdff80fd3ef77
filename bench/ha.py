"""HA timings on real libvirtd hosts and real QEMU guests, from the fault to a guest that is really up.

    python bench/ha.py [--runs 3]

The real daemon runs in-process against two lab libvirtd hosts reached over **TCP** (``qemu+tcp://``, libvirt
keepalive at the configured defaults, 1 s x 3) with the documented default ``host_down_after_s`` (3 s). For every
fault it measures, per run, from the moment of the fault to

* ``qemu``:  the new QEMU process of the VM exists (its pid file names a live process other than the old one);
* ``ready``: the guest's own ready line (``MOLDD-GUEST-READY``, printed by its init once booted) appears on its
  serial console: kernel boot under TCG (no KVM here) is included.

Faults:

* ``qemu_kill``:   the VM's QEMU is SIGKILLed (libvirt reports STOPPED/FAILED; restart on the same host).
* ``guest_poweroff``: the guest powers itself off (``halt_after=N``; the fault time is when the bench sees the
  guest's ``MOLDD-GUEST-HALTING`` line, polled every 5 ms); policy ``always`` restarts it.
* ``host_power_loss``: the VM's host stops answering (libvirtd SIGSTOPped: the TCP link stays open and silent,
  as with a machine that lost power) and its QEMUs are SIGKILLed at the same moment. Only keepalive notices;
  then ``host_down_after_s``, fencing (the lab fence command), restart on the other host.
* ``host_freeze``: the VM's host's libvirtd is SIGSTOPped, its guests keep running until fencing kills them.

Reports min / median / max of each figure over ``--runs`` runs, with the machine's load average (1, 5, 15 min)
before and after: the machine is shared, so the figures mean little without it. Prints the figures, then as the
LAST line one JSON object.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moldd.logging import configure_logging
from moldlab import Lab, build_guest
from moldlab.testing.harness import Client, running_daemon, write_config

CACHE = Path(os.environ.get("MOLDD_LAB_CACHE", Path(__file__).resolve().parent.parent / ".lab" / "cache"))
READY = "MOLDD-GUEST-READY"
HALTING = "MOLDD-GUEST-HALTING"
HOST_DOWN_AFTER_S = 3.0  # moldd's documented default ([ha] host_down_after_s)
HALT_AFTER_S = 6


def qemu_pid(host: Any, domain: str) -> int | None:
    try:
        pid = int((Path(host.dir) / "run" / "qemu" / f"{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def console_text(vm: dict[str, Any]) -> str:
    log = Path(vm["root_disk"]["path"]).parent / "console.log"
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


async def poll(check: Callable[[], Any], timeout: float, what: str, every: float = 0.005) -> float:
    """Wait until ``check()`` is truthy; returns the time.monotonic() at which it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(every)


async def measure(
    lab: Lab, client: Client, name: str, fault: Callable[[dict[str, Any]], Awaitable[float]], timeout: float = 600
) -> tuple[float, float, str]:
    """Run one fault; returns (to new QEMU, to guest ready, host it came back on)."""
    vm = await client.wait_vm(name, timeout=60, state="Running", power_state="on")
    await poll(lambda: READY in console_text(vm), 60, "guest ready before the fault", every=0.05)
    old = {h.name: qemu_pid(h, vm["internal_name"]) for h in lab.hosts}
    ready_before = console_text(vm).count(READY)
    t0 = await fault(vm)

    def new_qemu() -> bool:
        for h in lab.hosts:
            if h.is_frozen():
                continue
            pid = qemu_pid(h, vm["internal_name"])
            if pid is not None and pid != old[h.name]:
                return True
        return False

    t_qemu = await poll(new_qemu, timeout, "new QEMU")
    t_ready = await poll(lambda: console_text(vm).count(READY) > ready_before, timeout, "guest ready again")
    after = await client.wait_vm(name, timeout=30, state="Running")
    return t_qemu - t0, t_ready - t0, str(after["host"])


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    guest = build_guest(CACHE)
    root = Path(tempfile.mkdtemp(prefix="moldd-bench-ha-"))
    results: dict[str, list[tuple[float, float]]] = {}
    with Lab(root / "lab", n_hosts=2, qemu_caps_cache=CACHE / "qemu-caps", tcp=True) as lab:
        config = write_config(
            root / "moldd", lab.hosts, guest,
            ha={"host_down_after_s": HOST_DOWN_AFTER_S, "max_restarts": 1000, "window_s": 1.0},
        )  # fmt: skip
        assert all(h.uri.startswith("qemu+tcp://") for h in config.hosts)
        by_name = {h.name: h for h in lab.hosts}
        async with running_daemon(config), Client(config.socket) as client:

            async def kill_qemu(vm: dict[str, Any]) -> float:
                pid = qemu_pid(by_name[vm["host"]], vm["internal_name"])
                assert pid is not None
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                return t0

            async def power_loss(vm: dict[str, Any]) -> float:
                host = by_name[vm["host"]]
                pids = list(host.qemu_pids())
                t0 = time.monotonic()
                host.freeze()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return t0

            async def freeze(vm: dict[str, Any]) -> float:
                t0 = time.monotonic()
                by_name[vm["host"]].freeze()
                return t0

            async def thaw_all() -> None:
                for h in lab.hosts:
                    if h.is_frozen():
                        h.thaw()
                for h in lab.hosts:
                    await client.wait_host(h.name, timeout=60, health="Up", link="connected")

            name = (await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True))["vm"]
            for label, fault in (("qemu_kill", kill_qemu), ("host_power_loss", power_loss), ("host_freeze", freeze)):
                runs = results.setdefault(label, [])
                for i in range(args.runs):
                    await asyncio.sleep(1.2)  # past the 1 s restart window: every fault is a first restart
                    to_qemu, to_ready, host = await measure(lab, client, name, fault)
                    runs.append((to_qemu, to_ready))
                    print(f"{label} {i + 1}: new QEMU after {to_qemu:.3f} s, guest ready after {to_ready:.3f} s "
                          f"(on {host})", flush=True)  # fmt: skip
                    await thaw_all()

            # the guest powers itself off HALT_AFTER_S after each boot: every cycle is one run
            halter = (await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True,
                                       details={"kernel_args": f"halt_after={HALT_AFTER_S}"}))["vm"]  # fmt: skip
            runs = results.setdefault("guest_poweroff", [])

            async def guest_halts(vm: dict[str, Any]) -> float:
                before = console_text(vm).count(HALTING)
                return await poll(lambda: console_text(vm).count(HALTING) > before, 120, "halt")

            for i in range(args.runs):
                to_qemu, to_ready, host = await measure(lab, client, halter, guest_halts)
                runs.append((to_qemu, to_ready))
                print(f"guest_poweroff {i + 1}: new QEMU after {to_qemu:.3f} s, guest ready after {to_ready:.3f} s",
                      flush=True)  # fmt: skip
    out: dict[str, Any] = {}
    for label, runs in results.items():
        for i, what in enumerate(("qemu", "ready")):
            values = [r[i] for r in runs]
            out[f"{label}_to_{what}_s"] = {
                "min": round(min(values), 3),
                "median": round(statistics.median(values), 3),
                "max": round(max(values), 3),
                "runs": len(values),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    configure_logging("warning")  # the daemon's own log: warnings (HA decisions) only
    load_before = os.getloadavg()
    figures = asyncio.run(bench(parser.parse_args()))
    load_after = os.getloadavg()
    figures["load_before"] = [round(x, 2) for x in load_before]
    figures["load_after"] = [round(x, 2) for x in load_after]
    figures["cpus"] = os.cpu_count()
    figures["host_down_after_s"] = HOST_DOWN_AFTER_S
    figures["link"] = "qemu+tcp, libvirt keepalive"
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{key:34} min {value['min']:7.3f}  median {value['median']:7.3f}  max {value['max']:7.3f}")
    print(f"load average (1/5/15 min) before {figures['load_before']}, after {figures['load_after']}, "
          f"{figures['cpus']} CPUs")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
