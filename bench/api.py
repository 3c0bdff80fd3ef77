"""Benchmark of the socket API: latency and throughput of reads and writes over the Unix socket.

The server (this process) is the real ``moldd.api`` server over an in-memory bus holding ``--vms`` VMs;
the clients run in a separate process (multiprocessing) on keep-alive connections, so the figures
include the kernel socket path, HTTP parsing, peer-credential checks, JSON both ways and the bus call.

Two phases after a warm-up:

1. saturation: ``--clients`` closed-loop clients send ``listVirtualMachines`` (every VM) as fast as
   replies come back → the highest read rate;
2. paced: the same clients send an open-loop schedule of ``--rate`` requests/s (5 % writes:
   ``updateVirtualMachine``); latency is measured from the scheduled send time, so a stalled server
   is charged for the requests it delayed (no coordinated omission) → p50/p99 at that load.

The last line printed is JSON: ``{"read_p50_ms", "read_p99_ms", "read_rps", "write_p99_ms"}``
(latencies from the paced phase, ``read_rps`` from saturation).

    python bench/api.py [--clients 32] [--duration 5] [--rate 2000] [--vms 200] [--read all|group|one]
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


class MemoryBus:
    """An in-process bus with the shape of the real one: a read model of VMs and an append-only list."""

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
                "state": rng.choice(states),
                "host": f"kvm{i % 4 + 1}",
                "group": ["web", "db", "batch", None][i % 4],
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
            filters = [(k, args[k]) for k in ("name", "state", "group", "host") if k in args]
            if "name" in args:
                vm = self.vms.get(args["name"])
                rows = [vm] if vm is not None and all(vm.get(k) == v for k, v in filters) else []
            else:
                rows = [vm for vm in self.vms.values() if all(vm.get(k) == v for k, v in filters)]
            return CommandReply({"count": len(rows), "virtualmachine": rows}, len(self.log))
        name = args.get("name")
        vm = self.vms.get(str(name))
        if vm is None:
            raise NotFound(f"no VM named {name!r}", field="name")
        if "displayname" not in args:
            raise ValidationError("displayname is required", field="displayname")
        vm["displayname"] = args["displayname"]
        vm["version"] += 1
        self.log.append(
            {"position": len(self.log) + 1, "stream_id": f"vm-{name}", "event_type": "vm.updated",
             "payload": dict(args), "actor": str(actor), "command_id": command_id}
        )  # fmt: skip
        return CommandReply({"virtualmachine": vm}, len(self.log))


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
    "one": {"name": "i-2-100-VM"},  # `moldctl vm show`
}


async def _clients(
    path: str, n: int, duration: float, rate: float, vm_names: list[str], read: str
) -> dict[str, Any]:
    conns = [await asyncio.open_unix_connection(path, limit=1 << 22) for _ in range(n)]
    read_req = _request({"command": READ_VERB, "args": READS[read]})
    counter = itertools.count()

    def write_req() -> bytes:
        i = next(counter)
        return _request(
            {"command": WRITE_VERB, "args": {"name": vm_names[i % len(vm_names)], "displayname": f"d{i}"}}
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


def _client_process(
    path: str, n: int, duration: float, rate: float, vm_names: list[str], read: str, out: Any
) -> None:
    try:
        out.send(asyncio.run(_clients(path, n, duration, rate, vm_names, read)))
    except BaseException as exc:
        out.send({"error": repr(exc)})
        raise


# ---------------------------------------------------------------------------------------------- main


def _pct(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def _main(args: argparse.Namespace) -> dict[str, float]:
    from moldd.api import async_serve
    from moldd.logging import configure_logging

    configure_logging("warning")
    bus = MemoryBus(args.vms)
    workdir = Path(tempfile.mkdtemp(prefix="moldd-bench-", dir="/tmp"))
    server = await async_serve(bus, workdir / "api.sock", use_socket_activation=False)
    if args.gc_freeze:
        # What the daemon should do once started: move the long-lived objects (modules, the read model)
        # out of the collector's view so full collections stay short.
        gc.collect()
        gc.freeze()
    try:
        assert server.path is not None
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_process,
            args=(server.path, args.clients, args.duration, args.rate, list(bus.vms), args.read, child_end),
        )
        proc.start()
        # The server keeps running on this loop while the client process works.
        ready = asyncio.Event()
        asyncio.get_running_loop().add_reader(parent_end.fileno(), ready.set)
        await ready.wait()
        asyncio.get_running_loop().remove_reader(parent_end.fileno())
        result = parent_end.recv()
        await asyncio.to_thread(proc.join)
    finally:
        await server.async_close()
        shutil.rmtree(workdir, ignore_errors=True)
    if "error" in result:
        raise SystemExit(f"client process failed: {result['error']}")

    sat, reads, writes = result["saturation"], result["reads"], result["writes"]
    read_rps = len(sat) / result["saturation_s"]
    reply = await bus.async_dispatch(READ_VERB, READS[args.read], None, Actor())
    body = len(json.dumps({"ok": True, "result": reply.result}))
    print(
        f"server pid {os.getpid()}, clients in pid {proc.pid}; {args.vms} VMs held; read = {READ_VERB} "
        f"{json.dumps(READS[args.read])} → {reply.result['count']} VMs, {body / 1024:.1f} KiB reply"
    )
    print(
        f"saturation ({args.clients} closed-loop clients, {args.duration:.0f} s): {read_rps:,.0f} reads/s, "
        f"p50 {_pct(sat, 50):.2f} ms, p99 {_pct(sat, 99):.2f} ms"
    )
    offered = (len(reads) + len(writes)) / result["paced_s"]
    print(
        f"paced ({args.rate:,.0f} req/s offered, {offered:,.0f} achieved, {WRITE_SHARE:.0%} writes): "
        f"reads p50 {_pct(reads, 50):.2f} ms p99 {_pct(reads, 99):.2f} ms max {max(reads) * 1000:.2f} ms "
        f"(n={len(reads)}); writes p50 {_pct(writes, 50):.2f} ms p99 {_pct(writes, 99):.2f} ms (n={len(writes)})"
    )
    if reads:
        print(f"paced read mean {statistics.fmean(reads) * 1000:.2f} ms")
    return {
        "read_p50_ms": round(_pct(reads, 50), 3),
        "read_p99_ms": round(_pct(reads, 99), 3),
        "read_rps": round(read_rps, 1),
        "write_p99_ms": round(_pct(writes, 99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=2000.0, help="offered requests/s in the paced phase")
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false", help="skip gc.freeze()")
    parser.add_argument(
        "--read", choices=sorted(READS), default="all", help="which listVirtualMachines query"
    )
    figures = asyncio.run(_main(parser.parse_args()))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
