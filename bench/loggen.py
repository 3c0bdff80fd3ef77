"""A realistic moldd log, generated fast: hosts, groups, VM deploys, starts, stops, updates, libvirt domain events
and HA restarts after crashes, with the payloads, actors and command/causation/correlation ids the daemon writes.

The rows are chained with ``events.chain`` (the bytes the writer produces) and inserted in bulk with the stdlib
``sqlite3`` into a log created by ``events.sqlite.migrate`` (same schema): the build is fast and is never timed.

    python bench/loggen.py PATH --vms 10000 --events 200000 [--hosts host1,host2] [--all-stopped]

``--all-stopped`` ends every VM Stopped (history unchanged otherwise), so a daemon whose hosts are libvirt test
drivers without these domains finds nothing to reconcile at start (bench/scale.py).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.sqlite import INSERT_EVENT, PAGE_SIZE, migrate

GROUPS = ("web", "db", "batch")
USER = "uid=1000(ops) gid=1000 pid=4242"
OFFERING = {"name": "small", "vcpus": 1, "memory_mib": 512, "cpu_shares": None, "ha_default": False}


class _Log:
    def __init__(self, conn: sqlite3.Connection, log_id: str, start_us: int) -> None:
        self.conn = conn
        self.prev = genesis_hash(log_id)
        self.position = 0
        self.versions: dict[str, int] = {}
        self.now = start_us
        self.rows: list[tuple[Any, ...]] = []

    def add(
        self,
        stream: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        actor: str = "system",
        command_id: str | None = None,
        causation: str | None = None,
        correlation: str | None = None,
    ) -> None:
        self.position += 1
        v = self.versions[stream] = self.versions.get(stream, 0) + 1
        self.now += 1000 + (self.position * 7919) % 2000  # ~2 ms apart, never backwards
        data = canonical_json(payload)
        fields = encode_fields(stream, event_type, actor, command_id, causation, correlation)
        h = link_hash(self.prev, self.position, v, self.now, 1, fields, data)
        self.rows.append(
            (self.position, stream, v, event_type, 1, self.now, actor, command_id, causation, correlation, data,
             self.prev, h)
        )  # fmt: skip
        self.prev = h
        if len(self.rows) >= 50_000:
            self.flush()

    def flush(self) -> None:
        self.conn.executemany(INSERT_EVENT, self.rows)  # command ids are in the rows (the store's lookup)
        self.rows.clear()


def _cmd(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate(
    path: Path,
    *,
    vms: int,
    events: int,
    hosts: tuple[str, ...] = ("kvm1", "kvm2", "kvm3", "kvm4"),
    all_stopped: bool = False,
    seed: int = 7,
    page_size: int = PAGE_SIZE,
) -> int:
    """Write the log at ``path`` (must not exist); returns the number of events. Its pages are those of a log the
    store creates unless ``page_size`` says otherwise."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    log_id = migrate(conn)
    conn.execute("BEGIN")
    log = _Log(conn, log_id, int(time.time() * 1e6) - events * 3000)
    for h in hosts:
        log.add(f"host-{h}", "host.registered", {"name": h, "uri": f"qemu+tcp://{h}/system", "cluster": "c1",
                                                 "max_vms": vms + 100})  # fmt: skip
        log.add(f"host-{h}", "host.link", {"kind": "connected", "host": h}, actor="libvirt")
    for g in GROUPS:
        c = _cmd(rng)
        log.add(f"group-{g}", "group.created", {"name": g, "description": ""}, actor=USER, command_id=c,
                causation=c)  # fmt: skip
    running: dict[str, str] = {}  # name -> host
    stopped: dict[str, str] = {}
    names: list[str] = []

    def job(stream: str, seq: list[tuple[str, dict[str, Any], str]], c: str) -> None:
        for i, (et, p, actor) in enumerate(seq):
            if actor == "libvirt":
                log.add(stream, et, p, actor=actor)
            else:
                log.add(stream, et, p, actor=actor, command_id=c if i == 0 else None, causation=c, correlation=c)

    def deploy(i: int) -> None:
        name = f"vm-{i:06d}-{rng.getrandbits(24):06x}"
        host = hosts[i % len(hosts)]
        c = _cmd(rng)
        internal = f"i-2-{i + 1}-VM"
        payload = {
            "name": name, "id": i + 1, "internal_name": internal, "uuid": _cmd(rng), "display_name": f"web-{i}",
            "hostname": name, "group": [*GROUPS, None][i % 4], "description": "", "os_type": "Linux",
            "host": host, "cluster": "c1", "ha_enabled": i % 2 == 0, "ha_policy": "always", "ha_priority": 0,
            "offering": OFFERING, "template": "debian-12", "iso": None, "root_disk": {"size_gb": None},
            "details": {}, "start": True,
        }  # fmt: skip
        s = f"vm-{name}"
        job(s, [
            ("vm.deploy.requested", payload, USER),
            ("vm.created", {"root_disk": {"path": f"/var/lib/moldd/vms/{name}/root.qcow2", "size_gb": 8.0},
                            "host": host}, USER),
            ("vm.start.requested", {"host": host, "cluster": "c1"}, USER),
            ("libvirt.domain_event", {"host": host, "domain": internal, "event": "STARTED", "detail": "BOOTED"},
             "libvirt"),
            ("vm.started", {"host": host, "job_status": "succeeded", "result": {"vm": name}}, USER),
        ], c)  # fmt: skip
        running[name] = host
        names.append(name)

    for i in range(vms):
        deploy(i)
        if log.position >= events:
            break
    internal_of = {n: f"i-2-{int(n[3:9]) + 1}-VM" for n in names}
    while log.position < events and names:
        name = rng.choice(names)
        s = f"vm-{name}"
        c = _cmd(rng)
        dom = internal_of[name]
        r = rng.random()
        if name in running:
            host = running[name]
            if r < 0.45:
                job(s, [
                    ("vm.stop.requested", {}, USER),
                    ("libvirt.domain_event", {"host": host, "domain": dom, "event": "STOPPED", "detail": "SHUTDOWN"},
                     "libvirt"),
                    ("vm.stopped", {"host": host, "job_status": "succeeded", "result": {"vm": name}}, USER),
                ], c)  # fmt: skip
                stopped[name] = running.pop(name)
            elif r < 0.6:
                log.add(s, "libvirt.domain_event", {"host": host, "domain": dom, "event": "STOPPED",
                                                    "detail": "CRASHED"}, actor="libvirt")  # fmt: skip
                j = _cmd(rng)
                log.add(s, "ha.restart.scheduled", {"cause": "crashed", "attempt": 1, "delay_s": 0.0}, actor="ha")
                for et, p in (
                    ("ha.restart.started", {"host": host, "cluster": "c1", "cause": "crashed"}),
                    ("ha.restart.succeeded", {"host": host, "job_status": "succeeded"}),
                ):
                    log.add(s, et, p, actor="ha", correlation=j, causation=j)
                    if et == "ha.restart.started":
                        log.add(s, "libvirt.domain_event", {"host": host, "domain": dom, "event": "STARTED",
                                                            "detail": "BOOTED"}, actor="libvirt")  # fmt: skip
            elif r < 0.8:
                job(s, [
                    ("vm.reboot.requested", {}, USER),
                    ("vm.rebooted", {"host": host, "job_status": "succeeded", "result": {"vm": name}}, USER),
                ], c)  # fmt: skip
            else:
                log.add(s, "vm.updated", {"changes": {"description": f"note {log.position}"}}, actor=USER,
                        command_id=c, causation=c)  # fmt: skip
        else:
            host = stopped[name]
            if r < 0.8:
                job(s, [
                    ("vm.start.requested", {"host": host, "cluster": "c1"}, USER),
                    ("libvirt.domain_event", {"host": host, "domain": dom, "event": "STARTED", "detail": "BOOTED"},
                     "libvirt"),
                    ("vm.started", {"host": host, "job_status": "succeeded", "result": {"vm": name}}, USER),
                ], c)  # fmt: skip
                running[name] = stopped.pop(name)
            else:
                log.add(s, "vm.updated", {"changes": {"description": f"note {log.position}"}}, actor=USER,
                        command_id=c, causation=c)  # fmt: skip
    if all_stopped:
        for name, host in list(running.items()):
            c = _cmd(rng)
            job(f"vm-{name}", [
                ("vm.stop.requested", {}, USER),
                ("libvirt.domain_event", {"host": host, "domain": internal_of[name], "event": "STOPPED",
                                          "detail": "SHUTDOWN"}, "libvirt"),
                ("vm.stopped", {"host": host, "job_status": "succeeded", "result": {"vm": name}}, USER),
            ], c)  # fmt: skip
    log.flush()
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return log.position


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--hosts", default="kvm1,kvm2,kvm3,kvm4")
    ap.add_argument("--all-stopped", action="store_true")
    ap.add_argument("--page-size", type=int, default=PAGE_SIZE, help="bytes per page (default: the store's)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    n = generate(args.path, vms=args.vms, events=args.events, hosts=tuple(args.hosts.split(",")),
                 all_stopped=args.all_stopped, page_size=args.page_size)  # fmt: skip
    print(f"wrote {n} events for {args.vms} VMs to {args.path} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
