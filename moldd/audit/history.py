"""``moldd-audit history``: one VM's timeline from the log.

Every event on the VM's stream (commands with their actor and command id, outcomes, libvirt domain events with
their host, facts found by resync), libvirt events of its domain recorded on a host stream (after the VM was
forgotten, or before moldd knew it), and HA decisions (``ha.*``) with their cause. The state before and after
each event is computed by folding the whole log through the daemon's ReadModel, so it is what the daemon
showed at that position.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from events import StoredEvent
from events.canonical import loads
from moldd.audit.errors import AuditError
from moldd.audit.log import fold_into, iso, iter_events, open_log
from moldd.projection.readmodel import ReadModel

_ACTOR = re.compile(r"^uid=(?P<uid>-?\d+|None)(?:\((?P<user>[^)]*)\))?")


@dataclass
class Entry:
    position: int
    at: str
    stream: str
    type: str
    kind: str  # command | outcome | libvirt | ha | reconcile | other
    actor: str
    uid: int | None
    user: str | None
    command_id: str | None
    causation_id: str | None
    correlation_id: str | None
    host: str | None
    state_before: str | None
    state_after: str | None
    power_before: str | None
    power_after: str | None
    host_before: str | None
    host_after: str | None
    cause: str | None
    summary: str
    payload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    vm: str
    id: int
    internal_name: str
    entries: list[Entry]

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "id": self.id,
            "internal_name": self.internal_name,
            "entries": [e.to_dict() for e in self.entries],
        }


def parse_actor(actor: str) -> tuple[int | None, str | None]:
    """``uid=1000(alice) gid=1000 pid=42`` -> (1000, "alice"); internal actors (system, ha, libvirt) -> (None,
    the actor)."""
    m = _ACTOR.match(actor)
    if m is None:
        return None, actor or None
    uid = None if m["uid"] == "None" else int(m["uid"])
    return uid, m["user"]


def _kind(event_type: str) -> str:
    if event_type.endswith(".requested"):
        return "command"
    if event_type == "libvirt.domain_event":
        return "libvirt"
    if event_type.startswith("ha."):
        return "ha"
    if event_type in ("vm.reconciled", "vm.stale_copy_destroyed"):
        return "reconcile"
    if event_type.startswith("vm."):
        return "outcome"
    return "other"


def _cause(ev: StoredEvent) -> str | None:
    p = ev.payload
    for key in ("cause", "reason", "stop_cause"):
        value = p.get(key)
        if value:
            return value if isinstance(value, str) else str(value)
    err = p.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    return None


def _summary(ev: StoredEvent, kind: str) -> str:
    p = ev.payload
    if kind == "libvirt":
        return f"{p.get('event')}/{p.get('detail')} on {p.get('host')}"
    if ev.event_type == "vm.deploy.requested":
        return f"deploy on {p.get('host')} offering {(p.get('offering') or {}).get('name', '?')}"
    bits = []
    for key in ("host", "job_status", "how", "forced", "state", "power_state"):
        if key in p and p[key] is not None:
            bits.append(f"{key}={p[key]}")
    return " ".join(bits)


def resolve_vm(conn: Any, key: str) -> tuple[str, int, str]:
    """(name, id, internal name) of the VM whose name, numeric id or internal name is ``key``."""
    rows = conn.execute(
        "SELECT payload FROM events WHERE event_type = 'vm.deploy.requested' ORDER BY position"
    ).fetchall()
    found: list[tuple[str, int, str]] = []
    for (raw,) in rows:
        try:
            p = loads(raw)
            found.append((str(p["name"]), int(p["id"]), str(p["internal_name"])))
        except (ValueError, KeyError, TypeError):
            continue
    k = key.strip()
    matchers: tuple[Callable[[tuple[str, int, str]], bool], ...] = (
        lambda f: f[0] == k,
        lambda f: k.isdigit() and f[1] == int(k),
        lambda f: f[2] == k,
    )
    for match in matchers:
        hits = [f for f in found if match(f)]
        if hits:
            return hits[-1]
    raise AuditError(f"no VM {key!r} in the log (give its name, numeric id or internal name)", field="vm")


def _concerns(ev: StoredEvent, name: str, internal: str) -> bool:
    if ev.stream_id == f"vm-{name}":
        return True
    p = ev.payload
    if ev.event_type == "libvirt.domain_event":
        return p.get("domain") == internal
    if ev.event_type.startswith("ha."):
        vms = p.get("vms")
        return p.get("vm") == name or (isinstance(vms, list) and name in vms)
    return False


def vm_history(db: str | Path, vm: str) -> History:
    with open_log(db) as conn:
        name, vm_id, internal = resolve_vm(conn, vm)
        model = ReadModel()
        entries: list[Entry] = []
        for ev in iter_events(conn):
            if not _concerns(ev, name, internal):
                fold_into(model, ev)
                continue
            before = model.vms.get(name)
            sb, pb, hb = (before.state, before.power_state, before.host) if before else (None, None, None)
            cause_before = (before.stop_cause, before.down_at) if before else (None, None)
            fold_into(model, ev)
            after = model.vms.get(name)
            sa, pa, ha = (after.state, after.power_state, after.host) if after else (None, None, None)
            cause = _cause(ev)
            if cause is None and after is not None and (after.stop_cause, after.down_at) != cause_before:
                cause = after.stop_cause  # the fold's verdict on why it went down (crashed, destroyed, ...)
            uid, user = parse_actor(ev.actor)
            kind = _kind(ev.event_type)
            host = ev.payload.get("host") if isinstance(ev.payload.get("host"), str) else ha
            entries.append(
                Entry(
                    position=ev.position,
                    at=iso(ev.recorded_at),
                    stream=ev.stream_id,
                    type=ev.event_type,
                    kind=kind,
                    actor=ev.actor,
                    uid=uid,
                    user=user,
                    command_id=ev.command_id,
                    causation_id=ev.causation_id,
                    correlation_id=ev.correlation_id,
                    host=host,
                    state_before=sb,
                    state_after=sa,
                    power_before=pb,
                    power_after=pa,
                    host_before=hb,
                    host_after=ha,
                    cause=cause,
                    summary=_summary(ev, kind),
                    payload=ev.payload,
                )
            )
    return History(name, vm_id, internal, entries)
