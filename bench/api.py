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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _clients(
    path: str,
    n: int,
    duration: float,
    rate: float,
    vm_names: list[str],
    read_args: dict[str, Any],
    server_pid: int,
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

    me = os.getpid()
    cpu0 = (_cpu_s(server_pid), _cpu_s(me))
    sat: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(closed_loop(r, w, t0 + duration, sat) for r, w in conns))
    sat_elapsed = time.perf_counter() - t0
    cpu1 = (_cpu_s(server_pid), _cpu_s(me))

    reads: list[float] = []
    writes: list[float] = []
    t1 = time.perf_counter()
    await asyncio.gather(
        *(paced(r, w, t1, t1 + duration, rate / n, reads, writes, random.Random(i))
          for i, (r, w) in enumerate(conns))
    )  # fmt: skip
    paced_elapsed = time.perf_counter() - t1
    cpu2 = (_cpu_s(server_pid), _cpu_s(me))
    for _, w in conns:
        w.close()
    return {
        # share of one core used by the server / the clients in each phase
        "cpu_saturation": [(b - a) / sat_elapsed for a, b in zip(cpu0, cpu1, strict=True)],
        "cpu_paced": [(b - a) / paced_elapsed for a, b in zip(cpu1, cpu2, strict=True)],
        "saturation": sat,
        "saturation_s": sat_elapsed,
        "reads": reads,
        "writes": writes,
        "paced_s": paced_elapsed,
    }


# ---------------------------------------------------------------------------------------------- server

# One test-driver "host": libvirt's in-process test driver with a private state per connection.
NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>i686</model><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
</node>
"""


def write_bench_config(root: Path, n_vms: int) -> Path:
    """A daemon config: two test-driver hosts with room for ``n_vms`` under the N-1 rule, one offering and a
    real qcow2 template. Log level is the daemon's default (info), written to a file as in production."""
    from moldd.testing.harness import write_template

    template = write_template(root / "images" / "tiny.qcow2")
    lines = [
        "[daemon]",
        f'socket = "{root}/moldd.sock"',
        f'database = "{root}/log.db"',
        f'storage_dir = "{root}/disks"',
        'log_level = "info"',
        "tolerated_host_failures = 1",
        "",
    ]
    for i in (1, 2):
        (root / f"host{i}.xml").write_text(NODE_XML)
        lines += [
            "[[hosts]]",
            f'name = "host{i}"',
            f'uri = "test://{root}/host{i}.xml"',
            'cluster = "c1"',
            f"max_vms = {n_vms + 10}",
            "",
        ]
    lines += [
        "[[offerings]]", 'name = "small"', "vcpus = 1", "memory_mib = 128", "",
        "[[templates]]", 'name = "tiny"', 'os_type = "Linux"', f'image = "{template}"', "",
    ]  # fmt: skip
    path = root / "moldd.toml"
    path.write_text("\n".join(lines))
    return path


async def _async_server(
    fake: bool, root: Path, n_vms: int, gc_freeze: bool, profile: str | None, conn: Any
) -> None:
    from moldd.logging import configure_logging

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    stop: Any
    if fake:
        from moldd.api import async_serve

        configure_logging("info")
        server = await async_serve(MemoryBus(n_vms), root / "api.sock", use_socket_activation=False)
        if gc_freeze:
            gc.collect()
            gc.freeze()
        path, stop = server.path, server.async_close
    else:
        from moldd.config import load_config
        from moldd.daemon import Daemon

        config = load_config(root / "moldd.toml")
        configure_logging(config.log_level)
        daemon = Daemon(config)
        await daemon.async_start()
        path, stop = str(config.socket), daemon.async_stop
    conn.send({"ready": path, "pid": os.getpid()})
    profiler: Any = None
    try:
        while (msg := await inbox.get()) != "stop":
            if msg == "profile" and profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        loop.remove_reader(conn.fileno())
        await stop()
    conn.send("stopped")


def _server_process(
    fake: bool, root: str, n_vms: int, gc_freeze: bool, profile: str | None, conn: Any
) -> None:
    # The daemon's log lines (and libvirt's own error prints) go to a file, as under systemd-journald.
    log_file = open(Path(root) / "server.log", "a", buffering=1)
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file
    asyncio.run(_async_server(fake, Path(root), n_vms, gc_freeze, profile, conn))


async def _async_populate(path: str, n_vms: int) -> None:
    """Deploy ``n_vms`` VMs through the API (not started), 16 at a time, a quarter in each group or none."""
    from moldd.testing.harness import Client

    async with Client(path) as c:
        for g in GROUPS:
            await c.call("createInstanceGroup", name=g)
        sem = asyncio.Semaphore(16)

        async def deploy(i: int) -> None:
            group = [*GROUPS, None][i % 4]
            extra = {"group": group} if group else {}
            async with sem:
                job = await c.job(
                    "deployVirtualMachine", timeout=300, offering="small", template="tiny", startvm=False,
                    displayname=f"web-{i:03d}", **extra,
                )  # fmt: skip
            if job["status"] != "succeeded":
                raise RuntimeError(f"deploy {i} failed: {job.get('error')}")

        await asyncio.gather(*(deploy(i) for i in range(n_vms)))


# ---------------------------------------------------------------------------------------------- main


def _pct(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def _main(args: argparse.Namespace) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="moldd-bench-", dir="/tmp"))
    if not args.fake:
        write_bench_config(root, args.vms)
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(
        target=_server_process,
        args=(args.fake, str(root), args.vms, args.gc_freeze, args.profile, child_end),
        daemon=True,
    )
    proc.start()
    try:
        ready = await asyncio.to_thread(parent_end.recv)
        path = ready["ready"]
        t0 = time.perf_counter()
        if not args.fake:
            await _async_populate(path, args.vms)
        populate_s = time.perf_counter() - t0
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
        names_reply = await _roundtrip_json(reader, writer, {"command": READ_VERB, "args": {}})
        vm_names = [vm["name"] for vm in names_reply["result"]["virtualmachine"]]
        read_args = dict(READS[args.read])
        if "id" in read_args:
            read_args["id"] = vm_names[0]
        reply = await _roundtrip_json(reader, writer, {"command": READ_VERB, "args": read_args})
        body_len = await _roundtrip(reader, writer, _request({"command": READ_VERB, "args": read_args}))
        writer.close()
        if args.profile:
            parent_end.send("profile")
        result = await _clients(
            path, args.clients, args.duration, args.rate, vm_names, read_args, ready["pid"]
        )
    finally:
        if proc.is_alive():
            parent_end.send("stop")
            if await asyncio.to_thread(parent_end.poll, 60):
                parent_end.recv()
        await asyncio.to_thread(proc.join, 10)
        shutil.rmtree(root, ignore_errors=True)

    sat, reads, writes = result["saturation"], result["reads"], result["writes"]
    read_rps = len(sat) / result["saturation_s"]
    server = (
        "in-memory bus (--fake)"
        if args.fake
        else f"real daemon, {args.vms} VMs deployed in {populate_s:.1f} s"
    )
    print(
        f"server pid {ready['pid']} ({server}), clients in pid {os.getpid()}; read = {READ_VERB} "
        f"{json.dumps(read_args)} → {reply['result']['count']} VMs, {body_len / 1024:.1f} KiB reply"
    )
    print(
        f"saturation ({args.clients} closed-loop clients, {args.duration:.0f} s): {read_rps:,.0f} reads/s, "
        f"p50 {_pct(sat, 50):.2f} ms, p99 {_pct(sat, 99):.2f} ms; CPU server {result['cpu_saturation'][0]:.0%} "
        f"clients {result['cpu_saturation'][1]:.0%}"
    )
    offered = (len(reads) + len(writes)) / result["paced_s"]
    print(
        f"paced ({args.rate:,.0f} req/s offered, {offered:,.0f} achieved, {WRITE_SHARE:.0%} writes): "
        f"reads p50 {_pct(reads, 50):.2f} ms p99 {_pct(reads, 99):.2f} ms max {max(reads) * 1000:.2f} ms "
        f"(n={len(reads)}); writes p50 {_pct(writes, 50):.2f} ms p99 {_pct(writes, 99):.2f} ms (n={len(writes)})"
    )
    if reads:
        print(
            f"paced read mean {statistics.fmean(reads) * 1000:.2f} ms; CPU server {result['cpu_paced'][0]:.0%} "
            f"clients {result['cpu_paced'][1]:.0%}; load average {os.getloadavg()}"
        )
    if args.profile:
        print(f"server profile (saturation + paced phases) in {args.profile}")
    return {
        "read_p50_ms": round(_pct(reads, 50), 3),
        "read_p99_ms": round(_pct(reads, 99), 3),
        "read_rps": round(read_rps, 1),
        "write_p99_ms": round(_pct(writes, 99), 3),
    }


async def _roundtrip_json(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: dict[str, Any]
) -> Any:
    writer.write(_request(body))
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
    return json.loads(await reader.readexactly(length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=2000.0, help="offered requests/s in the paced phase")
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--fake", action="store_true", help="serve over an in-memory bus, not the daemon")
    parser.add_argument(
        "--no-gc-freeze", dest="gc_freeze", action="store_false", help="--fake: skip gc.freeze()"
    )
    parser.add_argument("--profile", metavar="FILE", help="cProfile the server during both phases")
    parser.add_argument(
        "--read", choices=sorted(READS), default="all", help="which listVirtualMachines query"
    )
    args = parser.parse_args()
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    figures = asyncio.run(_main(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
