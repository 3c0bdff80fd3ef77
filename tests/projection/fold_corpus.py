"""A deterministic, adversarial corpus of log events for the fold: every event type the fold knows, with the
payloads the daemon writes, over a few VMs and hosts, in random (but seeded) orders, including orders the daemon
would not produce (late outcomes, events for unknown VMs, repeated requests). Jobs start and finish (or fail, or
never finish), events share a commit time now and then and some times fall on a whole second.

``tests/projection/fold_reference.json`` holds, for this corpus, digests of the read model at checkpoints as the
fold computed them before its rewrite for speed (``python -m tests.projection.fold_corpus --record``, run on
that code); ``test_fold_reference.py`` checks that every fold path still computes exactly that state."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from events import StoredEvent
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.envelope import datetime_to_us
from events.sqlite import INSERT_EVENT, migrate

REFERENCE = Path(__file__).with_name("fold_reference.json")
SEEDS = (1, 2, 3)
EVENTS = 6000
CHECK_EVERY = 250
MAX_FINISHED_JOBS = 120  # the fold's limits while the corpus is folded (so that pruning happens)
PRUNE_SLACK = 16
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

HOSTS = ("h1", "h2", "h3")
GROUPS = ("web", "db")
ERR = {"message": "boom", "code": "X"}


def corpus(seed: int, n: int = EVENTS) -> list[StoredEvent]:
    rng = random.Random(seed)
    events: list[StoredEvent] = []
    versions: dict[str, int] = {}
    at = T0
    names = [f"vm{i}" for i in range(24)]
    snaps: dict[str, list[str]] = {}
    jobs_open: list[tuple[str, str, str]] = []  # (job id, vm, command)
    job_n = 0

    def add(stream: str, et: str, payload: dict[str, Any], corr: str | None = None, actor: str = "t") -> None:
        nonlocal at
        r = rng.random()
        if r < 0.15:
            pass  # same commit time as the previous event
        elif r < 0.25:
            at = (at + timedelta(seconds=1)).replace(microsecond=0)
        else:
            at = at + timedelta(microseconds=rng.randrange(1, 3_000_000))
        versions[stream] = versions.get(stream, 0) + 1
        events.append(StoredEvent(len(events) + 1, stream, versions[stream], et, 1, at, actor, None, None, corr,
                                  payload, b"", b""))  # fmt: skip

    def new_job() -> str:
        nonlocal job_n
        job_n += 1
        return f"job-{seed}-{job_n}"

    for h in HOSTS:
        add(f"host-{h}", "host.registered", {"name": h, "uri": f"qemu+tcp://{h}/system", "cluster": "c1",
                                             "max_vms": 50})  # fmt: skip
    for g in GROUPS:
        add(f"group-{g}", "group.created", {"name": g, "description": f"the {g} group"})
    next_id = 1

    def vm_payload(name: str) -> dict[str, Any]:
        nonlocal next_id
        next_id += 1
        host = rng.choice(HOSTS)
        return {
            "name": name, "id": next_id, "internal_name": f"i-2-{next_id}-VM", "uuid": f"u-{name}-{next_id}",
            "display_name": name.upper(), "hostname": name, "group": rng.choice([*GROUPS, None]),
            "description": "d", "os_type": "Linux", "host": host, "cluster": "c1",
            "ha_enabled": rng.random() < 0.5, "ha_policy": rng.choice(["always", "never"]), "ha_priority": 1,
            "offering": {"name": "small", "vcpus": 1, "memory_mib": rng.choice([128, 256]), "dynamic": False},
            "template": "t1", "iso": None, "root_disk": {"size_gb": None}, "details": {"k": "v"}, "start": True,
        }  # fmt: skip

    vm_ops: list[tuple[str, str, dict[str, Any] | None]] = [
        ("vm.created", "", {"root_disk": {"path": "/d/r.qcow2", "size_gb": 8.0}}),
        ("vm.deploy.failed", "failed", {"error": ERR}),
        ("vm.start.requested", "request", {"cluster": "c1"}),
        ("vm.started", "succeeded", {}),
        ("vm.start.failed", "failed", {"error": ERR}),
        ("vm.stop.requested", "request", {}),
        ("vm.stopped", "succeeded", {}),
        ("vm.stop.failed", "failed", {"error": ERR}),
        ("vm.reboot.requested", "request", {}),
        ("vm.rebooted", "succeeded", {}),
        ("vm.reboot.failed", "failed", {"error": ERR}),
        ("vm.destroy.requested", "request", {}),
        ("vm.destroyed", "succeeded", {"expunge_at": "2026-03-02T00:00:00+00:00"}),
        ("vm.destroy.failed", "failed", {"error": ERR}),
        ("vm.recovered", "", {"cluster": "c1"}),
        ("vm.expunge.requested", "request", {}),
        ("vm.expunge.failed", "failed", {"error": ERR}),
        ("vm.expunged", "succeeded", {}),
        ("vm.updated", "", None),
        ("vm.settings.changed", "", None),
        ("vm.offering.changed", "", None),
        ("vm.scale.requested", "request", {}),
        ("vm.scaled", "succeeded", None),
        ("vm.scale.failed", "failed", {"error": ERR}),
        ("vm.volume.resize.requested", "request", {}),
        ("vm.volume.resized", "succeeded", None),
        ("vm.volume.resize.failed", "failed", {"error": ERR}),
        ("vm.migrate.requested", "request", {}),
        ("vm.migrate.progress", "", {"progress": {"percent": 50}}),
        ("vm.migrated", "succeeded", None),
        ("vm.migrate.failed", "failed", None),
        ("vm.restore.requested", "request", {}),
        ("vm.restored", "succeeded", {"template": "t2", "root_disk": {"path": "/d/r2.qcow2"}, "os_type": "BSD"}),
        ("vm.restore.failed", "failed", {"error": ERR}),
        ("vm.iso.attach.requested", "request", {}),
        ("vm.iso.attached", "succeeded", {"iso": "debian.iso"}),
        ("vm.iso.attach.failed", "failed", {"error": ERR}),
        ("vm.iso.detach.requested", "request", {}),
        ("vm.iso.detached", "succeeded", {}),
        ("vm.iso.detach.failed", "failed", {"error": ERR}),
        ("vm.console.opened", "", {"user": "ops"}),
        ("vm.reconciled", "", None),
        ("vm.stale_copy_destroyed", "", {"host": "h2"}),
        ("vm.job.crashed", "failed", {"error": ERR}),
        ("vm.stale_definition_removed", "", {"host": "h3"}),
        ("ha.restart.scheduled", "", {"cause": "crashed", "attempt": 1, "delay_s": 0.0}),
        ("ha.restart.started", "request", {"cluster": "c1"}),
        ("ha.restart.succeeded", "succeeded", {}),
        ("ha.restart.failed", "failed", None),
        ("ha.gave_up", "", {"reason": "too many restarts"}),
        ("ha.cancelled", "", {}),
        ("ha.not_restarted", "", {"reason": "policy"}),
        ("ha.waiting", "", {"reason": "no room"}),
        ("ha.fence_lied", "", {"reason": "fence lied"}),
        ("libvirt.domain_event", "", None),
        ("vmsnapshot.create.requested", "request", None),
        ("vmsnapshot.created", "succeeded", None),
        ("vmsnapshot.failed", "failed", None),
        ("vmsnapshot.revert.requested", "request", None),
        ("vmsnapshot.reverted", "succeeded", None),
        ("vmsnapshot.revert.failed", "failed", None),
        ("vmsnapshot.delete.requested", "request", None),
        ("vmsnapshot.deleted", "succeeded", None),
        ("vmsnapshot.delete.failed", "failed", None),
    ]
    states = ["Running", "Stopped", "Error", "Unknown"]
    deployed: list[str] = []
    users: list[str] = []
    while len(events) < n:
        r = rng.random()
        if r < 0.06 or not deployed:
            name = rng.choice(names)
            if name in deployed and rng.random() < 0.8:
                continue
            j = new_job()
            add(f"vm-{name}", "vm.deploy.requested", vm_payload(name), j, "ops")
            deployed.append(name)
            jobs_open.append((j, name, "vm.deploy"))
            continue
        if r < 0.09:
            h = rng.choice(HOSTS)
            kind = rng.choice(["host.link", "host.health", "host.registered"])
            if kind == "host.link":
                add(f"host-{h}", kind, {"kind": rng.choice(["connected", "disconnected"]), "host": h}, None, "libvirt")
            elif kind == "host.health":
                add(f"host-{h}", kind, {"to": rng.choice(["Up", "Suspect", "Down", "Fenced"]), "from": "Up",
                                        "cause": rng.choice(["", "no answer"])})  # fmt: skip
            else:
                add(f"host-{h}", kind, {"name": h, "uri": f"qemu+ssh://{h}/system", "cluster": "c2", "max_vms": 9})
            continue
        if r < 0.10:
            g = rng.choice([*GROUPS, "tmp"])
            if rng.random() < 0.5:
                add(f"group-{g}", "group.created", {"name": g, "description": ""})
            else:
                add(f"group-{g}", "group.deleted", {"name": g})
            continue
        if r < 0.11:
            u = f"user{rng.randrange(4)}"
            kind = rng.choice(["user.created", "user.keys.registered", "user.revoked", "access.denied"])
            if kind == "user.created":
                users.append(u)
                add(f"user-{u}", kind, {"name": u, "id": f"id-{u}", "role": "admin", "apikey": f"k{len(events)}",
                                        "key_fingerprint": "f"})  # fmt: skip
            elif kind == "user.keys.registered":
                add(f"user-{u}", kind, {"name": u, "apikey": f"k{len(events)}", "key_fingerprint": "g"})
            elif kind == "user.revoked":
                add(f"user-{u}", kind, {"name": u})
            else:
                add("daemon", kind, {"actor": u, "command": "x"})
            continue
        if r < 0.115:
            kind = rng.choice(["cluster.capacity_low", "ha.evacuation", "ha.watcher_restarted",
                               "daemon.leader_elected", "snapshot.sealed", "unknown.future_type"])  # fmt: skip
            add(rng.choice(["cluster-c1", "host-h1", "daemon"]), kind, {"any": 1})
            continue
        name = rng.choice(deployed) if rng.random() < 0.97 else "ghost"
        et, role, payload = rng.choice(vm_ops)
        host = rng.choice(HOSTS)
        p: dict[str, Any] = dict(payload) if payload is not None else {}
        if et in ("vm.updated",):
            p = {"changes": {rng.choice(["description", "display_name", "ha_enabled", "group", "nope"]):
                             rng.choice(["x", True, False, None])}}  # fmt: skip
        elif et == "vm.settings.changed":
            p = {"details": {"cpu": str(rng.randrange(4))}, "changes": {"cpu": "1"}}
        elif et in ("vm.offering.changed", "vm.scaled"):
            p = {"offering": {"name": "big", "vcpus": 2, "memory_mib": 512, "min_memory_mib": 256}}
        elif et == "vm.volume.resized":
            p = {"new_size_gb": rng.choice([10, 20.5])}
        elif et == "vm.migrated":
            p = {"host": host, "cluster": "c1", "offline": rng.random() < 0.3}
        elif et == "vm.migrate.failed":
            p = {"error": ERR, "host": host}
            if rng.random() < 0.3:
                p["state"] = rng.choice(states)
            elif rng.random() < 0.3:
                p["domain_state"] = rng.choice(["shutoff", "crashed", "running"])
        elif et == "ha.restart.failed":
            p = {"error": ERR, "counts": rng.random() < 0.7}
        elif et == "vm.reconciled":
            p = {"state": rng.choice(states), "power_state": rng.choice(["on", "off", "paused"]), "host": host}
            if rng.random() < 0.4:
                p["stop_cause"] = rng.choice(["crashed", "destroyed", "guest-shutdown"])
            if rng.random() < 0.3:
                p["error"] = ERR if rng.random() < 0.5 else None
                p["reason"] = "drift"
        elif et == "libvirt.domain_event":
            p = {"host": rng.choice([host, None]), "domain": "d",
                 "event": rng.choice(["STARTED", "RESUMED", "SUSPENDED", "STOPPED", "DEFINED"]),
                 "detail": rng.choice(["BOOTED", "SHUTDOWN", "CRASHED", "DESTROYED", "MIGRATED", "FROM_SNAPSHOT",
                                       None])}  # fmt: skip
        elif et.startswith("vmsnapshot."):
            ids = snaps.setdefault(name, [])
            if et == "vmsnapshot.create.requested":
                sid = f"s{len(events)}"
                ids.append(sid)
                p = {"id": sid, "name": f"snap{len(ids)}", "description": "", "memory": rng.random() < 0.5,
                     "parent": rng.choice([*ids[:-1], None]) if len(ids) > 1 else None}  # fmt: skip
            else:
                sid = rng.choice(ids) if ids and rng.random() < 0.9 else "missing"
                p = {"id": sid}
                if et == "vmsnapshot.reverted":
                    p["state"] = rng.choice(["Running", "Stopped"])
                if et.endswith("failed"):
                    p["error"] = ERR
        if et in ("vm.start.requested", "vm.started", "ha.restart.started", "ha.restart.succeeded",
                  "vm.recovered", "vm.created") and rng.random() < 0.8:  # fmt: skip
            p["host"] = host
        corr: str | None = None
        if role == "request":
            corr = new_job()
            jobs_open.append((corr, name, et.removesuffix(".requested")))
        elif role in ("succeeded", "failed") and jobs_open and rng.random() < 0.85:
            corr, _, _ = jobs_open.pop(rng.randrange(len(jobs_open)))
            p["job_status"] = role
            if role == "succeeded":
                p["result"] = {"vm": name}
        elif jobs_open and rng.random() < 0.3:
            corr = rng.choice(jobs_open)[0]  # progress of a running job
            if rng.random() < 0.3:
                p["progress"] = {"step": rng.randrange(5)}
            if rng.random() < 0.2:
                p["vm"] = rng.choice(deployed)  # a job event naming its VM in the payload
        add(f"vm-{name}", et, p, corr, rng.choice(["ops", "ha", "libvirt", "system"]))
    return events


def write_sqlite(path: Path, events: list[StoredEvent], log_id: str = "fold-corpus") -> None:
    """Write ``events`` as a real, chained SQLite log (the writer's bytes, through ``events.chain``)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    log_id = migrate(conn)
    prev = genesis_hash(log_id)
    rows = []
    for ev in events:
        data = canonical_json(ev.payload)
        us = datetime_to_us(ev.recorded_at)
        fields = encode_fields(ev.stream_id, ev.event_type, ev.actor, ev.command_id, ev.causation_id,
                               ev.correlation_id)  # fmt: skip
        h = link_hash(prev, ev.position, ev.stream_version, us, 1, fields, data)
        rows.append((ev.position, ev.stream_id, ev.stream_version, ev.event_type, 1, us, ev.actor, ev.command_id,
                     ev.causation_id, ev.correlation_id, data, prev, h))  # fmt: skip
        prev = h
    conn.execute("BEGIN")
    conn.executemany(INSERT_EVENT, rows)
    conn.execute("COMMIT")
    conn.close()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()[:24]


def model_digests(model: Any) -> dict[str, str]:
    """What the fold's state is, in short: the snapshot form (every object's fields, jobs, users, ids), the
    user-visible view, and the derived queries."""
    return {
        "to_dict": digest(model.to_dict()),
        "view": digest(model.view()),
        "listed": digest([v.name for v in model.vms_listed()] + [v.name for v in model.vms_listed(True)]),
        "by_internal": digest(dict(model.by_internal)),
        "by_apikey": digest(dict(model.by_apikey)),
        "hosts": digest({h: model.host_counts(h) for h in sorted(model.hosts)}),
    }


def fold_checkpoints(events: list[StoredEvent]) -> dict[str, dict[str, str]]:
    from moldd.projection import readmodel

    saved = readmodel.MAX_FINISHED_JOBS, readmodel.PRUNE_SLACK
    readmodel.MAX_FINISHED_JOBS, readmodel.PRUNE_SLACK = MAX_FINISHED_JOBS, PRUNE_SLACK
    try:
        model = readmodel.ReadModel()
        out: dict[str, dict[str, str]] = {}
        for ev in events:
            model.apply(ev)
            if ev.position % CHECK_EVERY == 0 or ev.position == len(events):
                out[str(ev.position)] = model_digests(model)
        return out
    finally:
        readmodel.MAX_FINISHED_JOBS, readmodel.PRUNE_SLACK = saved


def main() -> None:
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.projection.fold_corpus --record  (on the reference fold)")
    ref = {str(seed): fold_checkpoints(corpus(seed)) for seed in SEEDS}
    REFERENCE.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
