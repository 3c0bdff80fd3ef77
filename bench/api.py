"""Benchmark of the socket API: latency and throughput of reads and writes over the Unix socket.

By default the server is the real daemon (``moldd.daemon.Daemon``) in a child process: its log is a real
SQLite event store, its two hosts are libvirt's in-process test driver (``test:///<node XML>``), and
``--vms`` VMs are deployed through the API first (``deployVirtualMachine startvm=false``: a real qcow2
overlay by qemu-img and a real domain definition). The clients run in this process on keep-alive
connections, so the figures include the kernel socket path, HTTP parsing, peer-credential checks, JSON
both ways, the verb and (for writes) a durable log append and its fold. ``--fake`` serves the API over
an in-memory bus instead (the API layer alone).

Two phases after a warm-up:

1. saturation: ``--clients`` closed-loop clients send ``listVirtualMachines`` (every VM) as fast as
   replies come back → the highest read rate;
2. paced: the same clients send an open-loop schedule of ``--rate`` requests/s (5 % writes:
   ``updateVirtualMachine`` of a description); latency is measured from the scheduled send time, so a
   stalled server is charged for the requests it delayed (no coordinated omission) → p50/p99 at that load.

The last line printed is JSON: ``{"read_p50_ms", "read_p99_ms", "read_rps", "write_p99_ms"}``
(latencies from the paced phase, ``read_rps`` from saturation).

    python bench/api.py [--clients 32] [--duration 5] [--rate 2000] [--vms 200] [--read all|group|one]
                        [--fake] [--profile FILE.pstats]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moldd.app.bus import Actor, CommandReply
from moldd.domain.errors import NotFound, ValidationError

READ_VERB = "listVirtualMachines"
WRITE_VERB = "updateVirtualMachine"
WRITE_SHARE = 0.05
GROUPS = ["web", "db", "batch"]


class MemoryBus:
    """``--fake``: an in-process bus with the shape of the real one: a read model of VMs and a list as log."""

    def __init__(self, n_vms: int) -> None:
        rng = random.Random(7)
        states = ["Running"] * 6 + ["Stopped"] * 3 + ["Destroyed"]
        self.vms: dict[str, dict[str, Any]] = {}
        for i in range(n_vms):
            name = f"i-2-{100 + i}-VM"
            self.vms[name] = {
                "name": name,
                "displayname": f"web-{i:03d}",
                "hostname": f"web-{i:03d}",
                "description": "",
                "state": rng.choice(states),
                "host": f"kvm{i % 4 + 1}",
                "group": [*GROUPS, None][i % 4],
                "serviceoffering": ["small", "medium", "large"][i % 3],
                "template": "debian-12",
                "haenable": i % 2 == 0,
                "cpunumber": 2,
                "memory": 2048,
                "rootdisksize": 20,
                "created": "2026-11-25T16:00:00Z",
                "version": 1,
            }
        self.log: list[dict[str, Any]] = []

    def verbs(self) -> list[str]:
        return [READ_VERB, WRITE_VERB]

    def health(self) -> dict[str, Any]:
        return {"ok": True}

    async def async_follow(self, from_position: int) -> AsyncIterator[dict[str, Any]]:
        for entry in self.log[from_position - 1 :]:
            yield entry

    async def async_dispatch(
        self, verb: str, args: Mapping[str, Any], command_id: str | None, actor: Actor
    ) -> CommandReply:
        if verb == READ_VERB:
            filters = [(k, args[k]) for k in ("state", "group", "host") if k in args]
            if "id" in args:
                vm = self.vms.get(args["id"])
                rows = [vm] if vm is not None and all(vm.get(k) == v for k, v in filters) else []
            else:
                rows = [vm for vm in self.vms.values() if all(vm.get(k) == v for k, v in filters)]
            return CommandReply({"count": len(rows), "virtualmachine": rows}, len(self.log))
        name = args.get("id")
        vm = self.vms.get(str(name))
        if vm is None:
            raise NotFound(f"no VM named {name!r}", field="id")
        if "description" not in args:
            raise ValidationError("description is required", field="description")
        vm["description"] = args["description"]
        vm["version"] += 1
        self.log.append(
            {"position": len(self.log) + 1, "stream_id": f"vm-{name}", "event_type": "vm.updated",
             "payload": dict(args), "actor": str(actor), "command_id": command_id}
        )  # fmt: skip
        return CommandReply({"vm": vm}, len(self.log))


# -------------------------------------------------------------------------------------------- client


def _request(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /v1/command HTTP/1.1\r\nHost: moldd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(raw)
    ) + raw


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    if status != 200 or not body.startswith(b'{"ok":true'):
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    return len(body)


READS = {
    "all": {},  # every VM: the heaviest read (what `moldctl vm list` sends)
    "group": {"group": "web"},  # a quarter of them
    "one": {"id": None},  # `moldctl vm show` (the first VM; filled in once the VMs exist)
}


async def _clients(
    path: str, n: int, duration: float, rate: float, vm_names: list[str], read_args: dict[str, Any]
) -> dict[str, Any]:
    conns = [await asyncio.open_unix_connection(path, limit=1 << 22) for _ in range(n)]
    read_req = _request({"command": READ_VERB, "args": read_args})
    counter = itertools.count()

    def write_req() -> bytes:
        i = next(counter)
        return _request(
            {"command": WRITE_VERB, "args": {"id": vm_names[i % len(vm_names)], "description": f"d{i}"}}
        )

    async def closed_loop(reader: Any, writer: Any, until: float, lat: list[float]) -> None:
        while (now := time.perf_counter()) < until:
            await _roundtrip(reader, writer, read_req)
            lat.append(time.perf_counter() - now)

    async def paced(reader: Any, writer: Any, start: float, until: float, per_client: float,
                    reads: list[float], writes: list[float], rng: random.Random) -> None:  # fmt: skip
        interval = 1.0 / per_client
        due = start + rng.random() * interval
        while due < until:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            is_write = rng.random() < WRITE_SHARE
            await _roundtrip(reader, writer, write_req() if is_write else read_req)
            (writes if is_write else reads).append(time.perf_counter() - due)
            due += interval

    # warm-up
    await asyncio.gather(*(closed_loop(r, w, time.perf_counter() + 1.0, []) for r, w in conns))

    sat: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(closed_loop(r, w, t0 + duration, sat) for r, w in conns))
    sat_elapsed = time.perf_counter() - t0

    reads: list[float] = []
    writes: list[float] = []
    t1 = time.perf_counter()
    await asyncio.gather(
        *(paced(r, w, t1, t1 + duration, rate / n, reads, writes, random.Random(i))
          for i, (r, w) in enumerate(conns))
    )  # fmt: skip
    paced_elapsed = time.perf_counter() - t1
    for _, w in conns:
        w.close()
    return {
        "saturation": sat,
        "saturation_s": sat_elapsed,
        "reads": reads,
        "writes": writes,
        "paced_s": paced_elapsed,
    }


MAIN_PLACEHOLDER
