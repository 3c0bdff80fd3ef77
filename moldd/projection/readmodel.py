"""Fold log events into the read model. Deterministic: the same events give the same model, whether folded live
by the daemon or replayed by ``moldd-audit state``; times come from the events, never from the clock."""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter, itemgetter
from sys import intern
from typing import Any, Final, NamedTuple, Protocol

import orjson

from events.canonical import loads as canonical_loads
from moldd.domain.capacity import committed_memory_mib
from moldd.domain.ha import HostHealth, down_cause
from moldd.domain.states import TRANSIENT, PowerState, VMState
from moldd.domain.vmsnapshots import remove_from_tree
from moldd.projection.model import VM, Captured, Group, Host, Job


class S:
    """``VMState``'s members as plain class attributes: the fold compares states millions of times, and
    Python 3.11 looks an Enum's members up on the Enum class several times slower."""

    CREATED: Final = VMState.CREATED
    RUNNING: Final = VMState.RUNNING
    STOPPED: Final = VMState.STOPPED
    DESTROYED: Final = VMState.DESTROYED
    EXPUNGED: Final = VMState.EXPUNGED
    CREATING: Final = VMState.CREATING
    STARTING: Final = VMState.STARTING
    STOPPING: Final = VMState.STOPPING
    DESTROYING: Final = VMState.DESTROYING
    EXPUNGING: Final = VMState.EXPUNGING
    MIGRATING: Final = VMState.MIGRATING
    ERROR: Final = VMState.ERROR
    UNKNOWN: Final = VMState.UNKNOWN


_POWER_ON, _POWER_OFF, _POWER_UNKNOWN = PowerState.ON, PowerState.OFF, PowerState.UNKNOWN
_HOST_UP = HostHealth.UP
_SETTLED_OFF = frozenset({VMState.STOPPED, VMState.CREATED, VMState.UNKNOWN})  # power-on events make them Running
_UP_OR_UNSURE = frozenset({VMState.RUNNING, VMState.UNKNOWN})
_GONE = frozenset({VMState.EXPUNGED, VMState.DESTROYED})  # hold no slot on their host
_ON_OR_UNSURE = frozenset({PowerState.ON, PowerState.UNKNOWN})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_orjson_loads = orjson.loads
_OrjsonDecodeError = orjson.JSONDecodeError


class EventLike(Protocol):
    """What the fold reads of an event (``events.StoredEvent`` fits)."""

    @property
    def position(self) -> int: ...
    @property
    def stream_id(self) -> str: ...
    @property
    def stream_version(self) -> int: ...
    @property
    def event_type(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def recorded_at(self) -> Any: ...


_last_at: Any = None  # the newest recorded_at turned into text, and that text: handlers ask several times per
_last_text = ""  # event, and a group commit's events share one recorded_at object
_last_second: int | None = None  # iso_us's cache: the newest whole second turned into text, and that text
_second_text = ""


def iso_us(us: int) -> str:
    """``us_to_datetime(us).isoformat()`` (microseconds since the Unix epoch, as stored), without the datetime:
    the date and time of day are worked out once per second."""
    global _last_second, _second_text
    second, micro = divmod(us, 1_000_000)
    if second != _last_second:
        _second_text = (_EPOCH + timedelta(seconds=second)).isoformat()[:-6]  # without "+00:00"
        _last_second = second
    if micro:
        return _second_text + "." + str(1_000_000 + micro)[1:] + "+00:00"  # (cheaper than a format spec)
    return _second_text + "+00:00"


_accelerator: Any
try:  # the optional C accelerator of the bulk fold (moldd/projection/_foldrows.c, built by setup.py)
    from moldd.projection import _foldrows as _accelerator
except ImportError:  # pragma: no cover - not built: the pure-Python functions, same results
    _accelerator = None
ACCELERATOR: Any = None if os.environ.get("MOLDD_FOLD_PURE_PYTHON") else _accelerator
"""``_foldrows`` (``read``, ``iso_us``, ``decode``, ...: each gives what its Python twin gives), or None:
not built, or ``MOLDD_FOLD_PURE_PYTHON`` set. Read at each bulk fold (tests switch it off)."""
if _accelerator is not None:
    _accelerator.set_fallback(iso_us)  # years outside 1..9999, or not a plain int: Python's answer (or error)
    _accelerator.set_decoders(_orjson_loads, _OrjsonDecodeError, canonical_loads)


def _iso(ev: EventLike) -> str:
    """The event's time as the fold records it (ISO 8601, ``datetime.isoformat``): ``recorded_at`` is an aware
    datetime (``StoredEvent``) or microseconds since the epoch (``FoldEvent``)."""
    global _last_at, _last_text
    at = ev.recorded_at
    if at is not _last_at:
        if type(at) is int:
            _last_text = iso_us(at)
        else:
            _last_text = at.isoformat() if hasattr(at, "isoformat") else str(at)
        _last_at = at
    return _last_text


def _epoch(ev: EventLike) -> float:
    at = ev.recorded_at
    if type(at) is int:
        return at / 1_000_000  # what datetime.timestamp() computes: the microseconds over 10**6, rounded once
    return float(at.timestamp()) if hasattr(at, "timestamp") else 0.0


FOLD_COLUMNS = (
    "position", "stream_id", "stream_version", "event_type", "schema_version", "recorded_at", "actor",
    "correlation_id", "payload",
)  # fmt: skip
"""The stored columns ``ReadModel.apply_rows`` reads, in its order (``events`` storage column names)."""
STORED_TO_FOLD = itemgetter(0, 1, 2, 3, 4, 5, 6, 9, 10)
"""A stored row (``events``' storage column order, as ``EventStore.async_read_rows`` returns) -> the fold's."""


class FoldEvent(NamedTuple):
    """An event as the fast fold paths (the daemon's restore, ``moldd-audit state``) hand it to the fold: what the
    fold reads of a ``StoredEvent``, with ``recorded_at`` as stored (microseconds since the Unix epoch)."""

    position: int
    stream_id: str
    stream_version: int
    event_type: str
    recorded_at: int
    actor: str
    correlation_id: str | None
    payload: dict[str, Any]


_new_tuple = tuple.__new__


def decode_payload(data: bytes | str) -> Any:
    """A stored payload decoded: ``events.canonical.loads`` (orjson where it gives the same values)."""
    return canonical_loads(data)


# Fields a `vm.updated` / `vm.settings.changed` event may set directly on the VM record.
EDITABLE = frozenset(
    {"display_name", "hostname", "group", "description", "os_type", "ha_enabled", "ha_policy", "ha_priority"}
)


MAX_FINISHED_JOBS = 10_000
"""Finished jobs kept in the read model (queryAsyncJobResult answers them); older ones live only in the log."""
_VM_ID = attrgetter("id")
PRUNE_SLACK = 1024  # prune in batches: a sort of the finished jobs per 1024 finished, not per job


class ReadModel:
    """Current VMs, hosts, groups and jobs, plus the log position folded so far."""

    def __init__(self) -> None:
        self.position = 0
        self.vms: dict[str, VM] = {}
        self.hosts: dict[str, Host] = {}
        self.groups: dict[str, Group] = {}
        self.jobs: dict[str, Job] = {}
        self.by_internal: dict[str, str] = {}
        self.next_vm_id = 1
        self._by_id: list[VM] | None = None  # vms_listed's caches
        self._listed: tuple[tuple[int, int], list[VM]] | None = None
        self._finished: deque[tuple[str, str]] = deque()  # (finished_at, job id) of finished jobs, oldest first
        # moldd users (API keys and roles), by name; ``by_apikey`` maps a live API key to its user.
        self.users: dict[str, dict[str, Any]] = {}
        self.by_apikey: dict[str, str] = {}

    # -- snapshots -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "vms": {k: v.to_dict() for k, v in self.vms.items()},
            "hosts": {k: v.to_dict() for k, v in self.hosts.items()},
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
            "jobs": {k: v.to_dict() for k, v in self.jobs.items()},
            "next_vm_id": self.next_vm_id,
            "users": {k: dict(v) for k, v in self.users.items()},
        }

    def snapshot_parts(self) -> dict[str, Any]:
        """What ``to_dict()`` holds, captured cheaply on the loop to be encoded on another thread: each record
        as a ``Captured`` row of its field values (the fold replaces a record's containers, never changes them
        in place, so sharing them is safe), users as copies (their dicts are updated in place). About a
        microsecond per record: a snapshot of 100,000 VMs holds the loop for a tenth of a second, not seconds."""
        return {
            "position": self.position,
            "vms": Captured.of(VM, self.vms),
            "hosts": Captured.of(Host, self.hosts),
            "groups": Captured.of(Group, self.groups),
            "jobs": Captured.of(Job, self.jobs),
            "next_vm_id": self.next_vm_id,
            "users": {k: dict(v) for k, v in self.users.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadModel:
        model = cls()
        model.position = data["position"]
        model.vms = {k: VM.from_dict(v) for k, v in data["vms"].items()}
        model.hosts = {k: Host.from_dict(v) for k, v in data["hosts"].items()}
        model.groups = {k: Group.from_dict(v) for k, v in data["groups"].items()}
        model.jobs = {k: Job.from_dict(v) for k, v in data["jobs"].items()}
        model.next_vm_id = data["next_vm_id"]
        model._finished = deque(sorted((j.finished_at, j.id) for j in model.jobs.values() if j.finished_at))
        if len(model._finished) > MAX_FINISHED_JOBS + PRUNE_SLACK:
            model.prune_jobs()  # a snapshot written before jobs were pruned
        model.users = {k: dict(v) for k, v in data.get("users", {}).items()}
        model.by_apikey = {u["apikey"]: k for k, u in model.users.items() if u.get("state") == "enabled"}
        # as the fold keeps it: an expunged VM's domain name is forgotten (``_expunged``)
        model.by_internal = {vm.internal_name: vm.name for vm in model.vms.values() if vm.state != S.EXPUNGED}
        return model

    def view(self) -> dict[str, Any]:
        """The user-visible state (what ``moldd-audit state`` prints and the daemon's lists show)."""
        return {
            "position": self.position,
            "vms": [v.to_dict() for v in sorted(self.vms.values(), key=lambda v: v.id)],
            "hosts": [h.to_dict() for h in sorted(self.hosts.values(), key=lambda h: h.name)],
            "groups": [g.to_dict() for g in sorted(self.groups.values(), key=lambda g: g.name)],
        }

    # -- queries ---------------------------------------------------------------------------------------
    def vms_listed(self, expunged: bool = False) -> list[VM]:
        """The VMs in id order (without the expunged ones unless ``expunged``), as lists answer them. Shared and
        cached until the model changes (sorted again only when a VM is added): do not modify."""
        vms = self.vms
        by_id = self._by_id
        if by_id is None or len(by_id) != len(vms):
            by_id = self._by_id = sorted(vms.values(), key=_VM_ID)
        if expunged:
            return by_id
        key = (self.position, len(by_id))
        cached = self._listed
        if cached is None or cached[0] != key:
            cached = self._listed = (key, [v for v in by_id if v.state != S.EXPUNGED])
        return cached[1]

    def vm_by_domain(self, domain: str) -> VM | None:
        name = self.by_internal.get(domain)
        return self.vms.get(name) if name else None

    def vms_on(self, host: str) -> list[VM]:
        return [
            vm for vm in self.vms.values() if vm.host == host and vm.state not in _GONE
        ]

    def counted_on(self, host: str) -> int:
        """VMs that hold a slot on a host: every VM placed there that is not destroyed or expunged."""
        return len(self.vms_on(host))

    def host_counts(self, host: str) -> dict[str, int]:
        """What ``listHosts`` (and ``moldd-audit state``) shows of a host beside its record: VMs holding a slot,
        running VMs, and the memory those offer and really commit (a dynamic offering's guest boots with its
        *maximum* memory; the balloon target only takes effect once a balloon driver in the guest honours it)."""
        placed = self.vms_on(host)
        running = [v for v in placed if v.state == S.RUNNING]
        return {
            "vms": len(placed),
            "running": len(running),
            "memory_offered_mib": sum(int(v.offering.get("memory_mib") or 0) for v in running),
            "memory_committed_mib": sum(committed_memory_mib(v.offering) for v in running),
        }

    # -- folding ---------------------------------------------------------------------------------------
    def apply_all(self, events: Iterable[EventLike]) -> ReadModel:
        for ev in events:
            self.apply(ev)
        return self

    def apply(self, ev: EventLike) -> None:
        pos = ev.position
        if pos <= self.position:
            return  # already folded (snapshot overlap or a replayed subscription)
        self.position = pos
        fn = _VM_HANDLERS.get(ev.event_type)
        if fn is not None:  # a type about a VM, on its stream: only for a VM the model knows
            vm = self.vms.get(ev.stream_id.removeprefix("vm-"))
            if vm is not None:
                vm.version = ev.stream_version
                vm.position = pos
                vm.updated_at = _iso(ev)
                fn(self, vm, ev)
        else:
            handler = _HANDLERS.get(ev.event_type)
            if handler is not None:
                handler(self, ev)
            sid = ev.stream_id
            if sid.startswith("vm-"):
                # Every event of a VM's stream moves the VM's version, whether or not a handler changed anything:
                # the version is what a command's optimistic check compares with the stream (a type the fold
                # does not act on must not leave the VM behind its stream, refusing every command with "kept
                # changing"). (A VM handler above has moved it already.)
                vm = self.vms.get(sid[3:])
                if vm is not None and vm.version < ev.stream_version:
                    vm.version = ev.stream_version
                    vm.position = pos
                    vm.updated_at = _iso(ev)
        if ev.correlation_id:
            self._track_job(ev)

    def apply_rows(self, rows: Iterable[Sequence[Any]], current: Mapping[str, int], upcast: Upcast) -> None:
        """Fold stored rows in the fold's column order (``FOLD_COLUMNS``: position, stream_id, stream_version,
        event_type, schema_version, recorded_at in microseconds, actor, correlation_id, payload as stored JSON):
        what ``apply`` of the ``StoredEvent`` of each row does, without building datetimes. ``current`` maps an
        event type to its current schema version; ``upcast(event_type, version, payload)`` brings an older
        payload up (``events.Upcasters.upcast``).

        This is ``apply`` inlined (a replay folds millions of rows; tests/projection/test_fold_reference.py
        holds both to the same results). The cyclic garbage collector is paused meanwhile: the fold makes
        no cycles, and each of its passes would walk the whole model."""
        global _last_at, _last_text
        accel = ACCELERATOR
        new, cls = _new_tuple, FoldEvent
        iso = iso_us if accel is None else accel.iso_us
        decode = canonical_loads if accel is None else accel.decode  # the same decoding (events.canonical.loads)
        version_of = current.get
        vm_handlers, handlers, vms, jobs, finish = _VM_HANDLERS, _HANDLERS, self.vms, self.jobs, self._job_finished
        collecting = gc.isenabled()
        gc.disable()
        try:
            last = self.position
            for pos, sid, sv, et, schema, at, actor, corr, payload in rows:
                if pos <= last:
                    continue
                data = decode(payload)
                if schema < version_of(et, 0):
                    _, data = upcast(et, schema, data)
                ev = new(cls, (pos, sid, sv, et, at, actor, corr, data))
                self.position = last = pos
                _last_text = text = iso(at)  # _iso(ev), done here once: nearly every event asks for it
                _last_at = at
                fn = vm_handlers.get(et)
                if fn is not None:
                    vm = vms.get(sid.removeprefix("vm-"))
                    if vm is not None:
                        vm.version = sv
                        vm.position = pos
                        vm.updated_at = text
                        fn(self, vm, ev)
                else:
                    handler = handlers.get(et)
                    if handler is not None:
                        handler(self, ev)
                    if sid.startswith("vm-"):
                        vm = vms.get(sid[3:])
                        if vm is not None and vm.version < sv:
                            vm.version = sv
                            vm.position = pos
                            vm.updated_at = text
                if corr:  # self._track_job(ev), inlined
                    vm = vms.get(data.get("vm") or sid.removeprefix("vm-"))
                    job = jobs.get(corr)
                    if job is None:
                        if not et.endswith(".requested"):
                            continue
                        job = Job(corr, et[:-10], vm.name if vm is not None else None, "running", text, actor, pos)
                        jobs[corr] = job
                        if vm is not None:
                            vm.job = corr
                    job.updated_at = text
                    if vm is not None:
                        job.state = vm.state
                    if "progress" in data:
                        job.progress = data["progress"]
                    status = data.get("job_status")
                    if status == "succeeded" or status == "failed":
                        finish(job, corr, vm, status, data, text)
        finally:
            if collecting:
                gc.enable()

    def prune_jobs(self) -> None:
        """Forget the jobs that finished first, keeping the MAX_FINISHED_JOBS newest (jobs that finished in the
        same instant as the oldest kept one stay too); the log keeps their events. Runs when the count passes
        MAX_FINISHED_JOBS + PRUNE_SLACK, so the read model and its snapshots stay bounded however long the log
        grows. What is kept depends only on the finish times the model holds, so a replay and a daemon restored
        from a snapshot keep the same jobs."""
        order = self._finished
        if len(order) <= MAX_FINISHED_JOBS:
            return
        cutoff = order[len(order) - MAX_FINISHED_JOBS][0]
        jobs = self.jobs
        while order and order[0][0] < cutoff:
            _, job_id = order.popleft()
            jobs.pop(job_id, None)

    def _track_job(self, ev: EventLike) -> None:
        job_id = ev.correlation_id
        if not job_id:
            return
        p = ev.payload
        vm = self.vms.get(p.get("vm") or ev.stream_id.removeprefix("vm-"))
        job = self.jobs.get(job_id)
        at = _iso(ev)
        if job is None:
            et = ev.event_type
            if not et.endswith(".requested"):
                return
            # Job(id, command, vm, status, created_at, actor, position): positional, a hot path
            job = Job(job_id, et[:-10], vm.name if vm is not None else None, "running", at, ev.actor, ev.position)
            self.jobs[job_id] = job
            if vm is not None:
                vm.job = job_id
        job.updated_at = at
        if vm is not None:
            job.state = vm.state
        if "progress" in p:
            job.progress = p["progress"]
        status = p.get("job_status")
        if status == "succeeded" or status == "failed":
            self._job_finished(job, job_id, vm, status, p, at)

    def _job_finished(
        self, job: Job, job_id: str, vm: VM | None, status: str, p: dict[str, Any], at: str
    ) -> None:
        """A job's event says it ended (``job_status``): record how, free its VM, prune old finished jobs."""
        newly = job.finished_at is None
        job.status = status
        job.finished_at = at
        if status == "failed":
            job.error, job.result = p.get("error"), None
        else:
            job.error, job.result = None, p.get("result")
        if vm is not None and vm.job == job_id:
            vm.job = None
        if newly:
            finished = self._finished
            finished.append((at, job_id))  # finish times never go backwards in the log
            if len(finished) > MAX_FINISHED_JOBS + PRUNE_SLACK:
                self.prune_jobs()  # this job finished last: it stays


Handler = Callable[[ReadModel, EventLike], None]
_HANDLERS: dict[str, Handler] = {}
Upcast = Callable[[str, int, Any], tuple[int, Any]]

STATE_NEUTRAL = frozenset(
    {
        "cluster.capacity_low",  # a warning on the cluster's stream
        "vm.stale_copy_destroyed",  # a copy on a host that is not the VM's: the VM itself does not change
        "vm.stale_definition_removed",  # a shut-off definition left on a previous host was undefined
        "ha.evacuation",  # on the host's stream; each VM's own vm.reconciled follows
        "ha.watcher_restarted",  # on the daemon's stream
        "vm.console.opened",  # who opened a VM's console: for the audit trail
        "access.denied",  # a refused call (who, what, why): for the audit trail
        "snapshot.sealed",  # the log's own bookkeeping (events.snapshot): binds a snapshot to the chain
        "daemon.leader_elected",  # a node took the lead of the cluster (moldd.cluster follows it itself)
    }
)
"""Event types the fold deliberately has no handler for. Every type in ``moldd.eventtypes`` has a handler or is
listed here (``tests/projection/test_registry.py``); either way an event on a VM's stream advances the VM's
version (``ReadModel.apply``)."""


def on(*types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for t in types:
            _HANDLERS[t] = fn
        return fn

    return register


VMHandler = Callable[[ReadModel, VM, EventLike], None]
_VM_HANDLERS: dict[str, VMHandler] = {}


def on_vm(*types: str) -> Callable[[VMHandler], VMHandler]:
    """Register a handler of events on a VM's stream; it runs only for a VM the model knows (and after the VM's
    version, position and update time have moved to this event: ``ReadModel.apply``)."""

    def register(fn: VMHandler) -> VMHandler:
        def handler(model: ReadModel, ev: EventLike) -> None:  # the same, as a plain handler (the registry's)
            vm = _vm(model, ev)
            if vm is not None:
                fn(model, vm, ev)

        for t in types:
            _VM_HANDLERS[t] = fn  # what ReadModel.apply calls
            _HANDLERS[t] = handler
        return fn

    return register


def _shared(value: Any) -> Any:
    """One string object for the many VMs that hold the same host, cluster, group, template, ... name (each
    event's JSON decodes its own copy): less memory per VM. Anything but a string is returned as is."""
    return intern(value) if type(value) is str else value


def _vm(model: ReadModel, ev: EventLike) -> VM | None:
    vm = model.vms.get(ev.stream_id.removeprefix("vm-"))
    if vm is not None:
        vm.version = ev.stream_version
        vm.position = ev.position
        vm.updated_at = _iso(ev)
    return vm


def _begin(vm: VM, state: VMState) -> None:
    if vm.state not in TRANSIENT:
        vm.prior_state = vm.state
    vm.state = state


def _fail_back(vm: VM, ev: EventLike) -> None:
    vm.state = vm.prior_state or vm.state
    vm.prior_state = None
    vm.error = (ev.payload.get("error") or {}).get("message")


# -- hosts and groups ------------------------------------------------------------------------------------
@on("host.registered")
def _host_registered(model: ReadModel, ev: EventLike) -> None:
    p = ev.payload
    name = p["name"]
    host = model.hosts.get(name)
    if host is None:
        host = Host(
            name=name, uri=p["uri"], cluster=p["cluster"], max_vms=p["max_vms"], health_since=_iso(ev)
        )
        model.hosts[name] = host
    host.uri, host.cluster, host.max_vms = p["uri"], p["cluster"], p["max_vms"]
    host.position = ev.position


@on("host.link")
def _host_link(model: ReadModel, ev: EventLike) -> None:
    host = model.hosts.get(ev.stream_id.removeprefix("host-"))
    if host is not None:
        host.link = "connected" if ev.payload["kind"] == "connected" else "disconnected"
        host.link_since = _iso(ev)
        host.position = ev.position


@on("host.health")
def _host_health(model: ReadModel, ev: EventLike) -> None:
    host = model.hosts.get(ev.stream_id.removeprefix("host-"))
    if host is not None:
        host.health = ev.payload["to"]
        host.health_since = _iso(ev)
        host.health_cause = ev.payload.get("cause", "")
        host.position = ev.position
        # Nobody can see the power of a VM on a host that does not answer; when it answers again the resync
        # that follows records any difference, so what the log last saw is back in force.
        unknown = host.health != _HOST_UP
        for vm in model.vms_on(host.name):
            if vm.state == S.RUNNING and vm.power_state in _ON_OR_UNSURE:
                vm.power_state = "unknown" if unknown else "on"


@on("group.created")
def _group_created(model: ReadModel, ev: EventLike) -> None:
    name = ev.payload["name"]
    model.groups[name] = Group(name=name, created_at=_iso(ev), description=ev.payload.get("description", ""))


@on("group.deleted")
def _group_deleted(model: ReadModel, ev: EventLike) -> None:
    model.groups.pop(ev.payload["name"], None)


# -- VM lifecycle ----------------------------------------------------------------------------------------
_DEPLOY_FIELDS = (
    "name", "id", "internal_name", "display_name", "hostname", "state", "uuid", "power_state", "group",
    "description", "os_type", "host", "cluster", "ha_enabled", "ha_policy", "ha_priority", "offering", "template",
    "iso", "root_disk", "details", "snapshots", "current_snapshot", "created_at", "updated_at", "version",
    "position",
)  # fmt: skip
if VM._FIELDS[: len(_DEPLOY_FIELDS)] != _DEPLOY_FIELDS:  # _deploy_requested passes these by position
    raise ImportError(f"moldd.projection.model.VM's fields changed order: update _deploy_requested ({VM._FIELDS})")


@on("vm.deploy.requested")
def _deploy_requested(model: ReadModel, ev: EventLike) -> None:
    p = ev.payload
    at = _iso(ev)
    # VM(...) by position (the fields' order is checked above): keyword arguments cost twice as much
    vm = VM(
        p["name"],
        p["id"],
        p["internal_name"],
        p["display_name"],
        p["hostname"],
        S.CREATING,
        p.get("uuid", ""),
        "off",
        _shared(p.get("group")),
        p.get("description", ""),
        _shared(p.get("os_type", "Linux")),
        _shared(p.get("host")),
        _shared(p.get("cluster")),
        p.get("ha_enabled", False),
        _shared(p.get("ha_policy", "always")),
        p.get("ha_priority", 0),
        dict(p["offering"]),
        _shared(p.get("template")),
        p.get("iso"),
        dict(p.get("root_disk", {})),
        dict(p.get("details", {})),
        {},
        None,
        at,
        at,
        ev.stream_version,
        ev.position,
    )
    model.vms[vm.name] = vm
    model._by_id = None
    model.by_internal[vm.internal_name] = vm.name
    model.next_vm_id = max(model.next_vm_id, vm.id + 1)


@on_vm("vm.created")
def _created(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.CREATED
    vm.root_disk = {**vm.root_disk, **ev.payload.get("root_disk", {})}
    vm.host = ev.payload.get("host", vm.host)


@on_vm("vm.deploy.failed")
def _deploy_failed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.ERROR
    vm.error = (ev.payload.get("error") or {}).get("message")


@on_vm("vm.start.requested", "ha.restart.started")
def _start_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _begin(vm, S.STARTING)
    vm.host = ev.payload.get("host", vm.host)
    vm.cluster = ev.payload.get("cluster", vm.cluster)
    vm.error = None


@on_vm("vm.started", "ha.restart.succeeded")
def _started(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.RUNNING
    vm.power_state = "on"
    vm.prior_state = None
    vm.host = ev.payload.get("host", vm.host)
    vm.stop_cause = None
    vm.error = None
    if ev.event_type == "ha.restart.succeeded":
        vm.ha_restarts = [*vm.ha_restarts[-19:], _epoch(ev)]
        vm.ha_status = None


@on_vm("vm.start.failed", "vm.stop.failed", "vm.destroy.failed")
def _failed_back(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _fail_back(vm, ev)


@on_vm("vm.expunge.failed")
def _expunge_failed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    # CloudStack: a failed expunge stays Expunging, and the expunge sweeper tries it again
    vm.state = S.EXPUNGING
    vm.error = (ev.payload.get("error") or {}).get("message")


@on_vm("ha.restart.failed")
def _ha_restart_failed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _fail_back(vm, ev)
    if ev.payload.get("counts", True):  # only the VM's own failures use up its restart budget
        vm.ha_restarts = [*vm.ha_restarts[-19:], _epoch(ev)]
    vm.ha_status = "pending"


@on_vm("ha.restart.scheduled")
def _ha_scheduled(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.ha_status = "pending"


@on_vm("ha.gave_up")
def _ha_gave_up(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.ERROR
    vm.ha_status = "failed"
    vm.error = ev.payload.get("reason")


@on_vm("ha.not_restarted")
def _ha_not_restarted(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.ha_status = None  # HA decided to leave it down (its policy): nothing is pending


@on_vm("ha.waiting")
def _ha_waiting(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.ha_status = "pending"  # waiting for room or for its old host to be fenced: a host coming Up wakes it


@on_vm("ha.fence_lied")
def _ha_fence_lied(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.ha_status = "pending"  # nothing was started; it waits for its host to answer (or an operator)
    vm.error = ev.payload.get("reason")


@on_vm("vm.job.crashed")
def _job_crashed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.error = (ev.payload.get("error") or {}).get("message") or vm.error


@on_vm("ha.cancelled")
def _ha_cancelled(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.ha_status = None


@on_vm("vm.stop.requested")
def _stop_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _begin(vm, S.STOPPING)


@on_vm("vm.stopped")
def _stopped(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.STOPPED
    vm.power_state = "off"
    vm.prior_state = None
    vm.stop_cause = "user"
    vm.ha_status = None


@on_vm("vm.reboot.requested", "vm.rebooted", "vm.reboot.failed")
def _reboot(model: ReadModel, vm: VM, ev: EventLike) -> None:
    pass  # the VM's version and time move (ReadModel.apply); nothing else changes


@on_vm("vm.destroy.requested")
def _destroy_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _begin(vm, S.DESTROYING)


@on_vm("vm.destroyed")
def _destroyed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.DESTROYED
    vm.power_state = "off"
    vm.prior_state = None
    vm.ha_status = None
    vm.snapshots = {}  # the domain's snapshot metadata goes with its definition
    vm.current_snapshot = None
    vm.expunge_at = ev.payload.get("expunge_at")


@on_vm("vm.recovered")
def _recovered(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.STOPPED
    vm.expunge_at = None
    vm.host = ev.payload.get("host", vm.host)
    vm.cluster = ev.payload.get("cluster", vm.cluster)


@on_vm("vm.expunge.requested")
def _expunge_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _begin(vm, S.EXPUNGING)


@on_vm("vm.expunged")
def _expunged(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.state = S.EXPUNGED
    vm.power_state = "off"
    vm.prior_state = None
    vm.expunge_at = None
    vm.host = None
    if model.by_internal.get(vm.internal_name) == vm.name:
        del model.by_internal[vm.internal_name]


@on_vm("vm.reconciled")
def _reconciled(model: ReadModel, vm: VM, ev: EventLike) -> None:
    """Resync/crash recovery: what libvirt showed, recorded as a fact."""
    p = ev.payload
    vm.state = VMState(p["state"])
    vm.power_state = p.get("power_state", vm.power_state)
    vm.host = p.get("host", vm.host)
    vm.prior_state = None
    if vm.state == S.ERROR:  # the VM's view carries the reason of its last failure, not only the job
        vm.error = (p.get("error") or {}).get("message") or p.get("reason") or vm.error
    if vm.state == S.RUNNING:
        vm.ha_status = None
        vm.error = None
        vm.stop_cause = None
    if p.get("stop_cause"):
        vm.stop_cause = p["stop_cause"]
        vm.down_at = _iso(ev)


@on_vm("vm.updated")
def _updated(model: ReadModel, vm: VM, ev: EventLike) -> None:
    for key, value in ev.payload.get("changes", {}).items():
        if key in EDITABLE:
            setattr(vm, key, value)
    if not vm.ha_enabled:
        vm.ha_status = None


# -- libvirt facts ---------------------------------------------------------------------------------------
@on_vm("libvirt.domain_event")
def _domain_event(model: ReadModel, vm: VM, ev: EventLike) -> None:
    p = ev.payload
    event, detail, host = p.get("event"), p.get("detail"), p.get("host")
    # _shared(...) of each, inlined: a quarter of a real log's events are these
    if type(event) is str:
        event = intern(event)
    if type(detail) is str:
        detail = intern(detail)
    if type(host) is str:
        host = intern(host)
    vm.last_domain_event = {"host": host, "event": event, "detail": detail, "at": _iso(ev)}
    if detail in ("MIGRATED", "FROM_SNAPSHOT"):
        return  # migration and snapshot-revert events are accounted for by the migrate / revert command
    if vm.state == S.MIGRATING:
        # Only a power-off of the source copy counts here (CloudStack: Migrating + PowerOff -> Stopped): its
        # QEMU died, the migration cannot succeed, and HA must see the VM down. The rest belongs to the job.
        if event == "STOPPED" and host == vm.host:
            vm.state = S.STOPPED
            vm.power_state = "off"
            vm.prior_state = None
            vm.stop_cause = str(down_cause(event, detail or ""))
            vm.down_at = _iso(ev)
        return
    if event in ("STARTED", "RESUMED"):
        if host == vm.host or vm.host is None:
            vm.power_state = "on"
            if vm.state in _SETTLED_OFF:
                vm.state = S.RUNNING  # started behind moldd's back: the hypervisor is the truth for power
                vm.stop_cause = None
    elif event == "SUSPENDED":
        if host == vm.host and vm.power_state != _POWER_OFF:
            vm.power_state = "paused"  # paused behind moldd's back (virsh suspend, I/O error, ...): drift shows
    elif event == "STOPPED":
        if host != vm.host:
            return  # a stale copy elsewhere stopped: not this VM's current incarnation
        vm.power_state = "off"
        if vm.state in _UP_OR_UNSURE:
            vm.state = S.STOPPED
            vm.stop_cause = str(down_cause(event, detail or ""))
            vm.down_at = _iso(ev)


# -- VM operations (moldd/app/operations.py) -------------------------------------------------------------
@on_vm(
    "vm.scale.requested", "vm.scale.failed", "vm.volume.resize.requested", "vm.volume.resize.failed",
    "vm.migrate.progress", "vm.restore.requested", "vm.restore.failed", "vm.iso.attach.requested",
    "vm.iso.attach.failed", "vm.iso.detach.requested", "vm.iso.detach.failed",
)  # fmt: skip
def _touch(model: ReadModel, vm: VM, ev: EventLike) -> None:
    pass  # recorded for the job and the audit trail; the VM itself does not change (but for its version)


@on_vm("vm.offering.changed", "vm.scaled")
def _offering(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.offering = dict(ev.payload["offering"])


@on_vm("vm.settings.changed")
def _settings(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.details = dict(ev.payload["details"])


@on_vm("vm.volume.resized")
def _resized(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.root_disk = {**vm.root_disk, "size_gb": ev.payload["new_size_gb"]}


@on_vm("vm.migrate.requested")
def _migrate_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    _begin(vm, S.MIGRATING)


@on_vm("vm.migrated")
def _migrated(model: ReadModel, vm: VM, ev: EventLike) -> None:
    if vm.state != S.MIGRATING:
        return  # HA (its source host was fenced) or a resync already settled where it runs
    p = ev.payload
    vm.host = p["host"]
    vm.cluster = p.get("cluster", vm.cluster)
    vm.state = (vm.prior_state or S.STOPPED) if p.get("offline") else S.RUNNING
    if not p.get("offline"):
        vm.power_state = "on"
    vm.prior_state = None
    vm.error = None


@on_vm("vm.migrate.failed")
def _migrate_failed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    if vm.state != S.MIGRATING:
        vm.error = (ev.payload.get("error") or {}).get("message")
        return  # a late outcome: HA or a resync already settled where it runs
    _fail_back(vm, ev)
    vm.host = ev.payload.get("host", vm.host)
    if ev.payload.get("state"):  # what libvirt showed on the source after the failure
        vm.state = VMState(ev.payload["state"])
        vm.power_state = "on" if vm.state == S.RUNNING else "off"
    elif ev.payload.get("domain_state") in ("shutoff", "crashed"):
        # the source QEMU died during the migration and its power-off event was not seen (CloudStack:
        # Migrating + PowerOff -> Stopped); HA acts on it as on any crash
        vm.state = S.STOPPED
        vm.power_state = "off"
        vm.stop_cause = "crashed"
        vm.down_at = _iso(ev)


@on_vm("vm.restored")
def _restored(model: ReadModel, vm: VM, ev: EventLike) -> None:
    p = ev.payload
    vm.template = p["template"]
    vm.root_disk = dict(p["root_disk"])
    vm.os_type = p.get("os_type", vm.os_type)


@on_vm("vm.iso.attached", "vm.iso.detached")
def _iso_changed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.iso = ev.payload.get("iso") if ev.event_type == "vm.iso.attached" else None


# -- VM snapshots (moldd/app/snapshots.py) ---------------------------------------------------------------
# A record's containers are never changed in place, only replaced (copy on write): a snapshot of the model
# shares them with the records (ReadModel.snapshot_parts) while the fold goes on.
def _snap_state(vm: VM, sid: str, state: str) -> None:
    vm.snapshots = {**vm.snapshots, sid: {**vm.snapshots[sid], "state": state}}


@on_vm("vmsnapshot.create.requested")
def _snap_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    p = ev.payload
    vm.snapshots = {**vm.snapshots, p["id"]: {
        "id": p["id"], "name": p["name"], "description": p.get("description", ""),
        "memory": bool(p.get("memory")), "parent": p.get("parent"), "state": "Creating",
        "created_at": _iso(ev), "vm_state": vm.state,
    }}  # fmt: skip


@on_vm("vmsnapshot.created")
def _snap_created(model: ReadModel, vm: VM, ev: EventLike) -> None:
    if ev.payload["id"] in vm.snapshots:
        _snap_state(vm, ev.payload["id"], "Ready")
        vm.current_snapshot = ev.payload["id"]


@on_vm("vmsnapshot.failed")
def _snap_failed(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.snapshots = {k: v for k, v in vm.snapshots.items() if k != ev.payload["id"]}


@on_vm("vmsnapshot.revert.requested", "vmsnapshot.revert.failed", "vmsnapshot.delete.failed")
def _snap_touch(model: ReadModel, vm: VM, ev: EventLike) -> None:
    if ev.payload.get("id") in vm.snapshots:
        busy = {"vmsnapshot.revert.requested": "Reverting"}.get(ev.event_type, "Ready")
        _snap_state(vm, ev.payload["id"], busy)


@on_vm("vmsnapshot.reverted")
def _snap_reverted(model: ReadModel, vm: VM, ev: EventLike) -> None:
    p = ev.payload
    if p["id"] in vm.snapshots:
        _snap_state(vm, p["id"], "Ready")
    vm.current_snapshot = p["id"]
    vm.state = VMState(p["state"])
    vm.power_state = "on" if p["state"] == S.RUNNING else "off"
    vm.prior_state = None
    if p["state"] == S.RUNNING:
        vm.stop_cause = None


@on_vm("vmsnapshot.delete.requested")
def _snap_delete_requested(model: ReadModel, vm: VM, ev: EventLike) -> None:
    if ev.payload["id"] in vm.snapshots:
        _snap_state(vm, ev.payload["id"], "Deleting")


@on_vm("vmsnapshot.deleted")
def _snap_deleted(model: ReadModel, vm: VM, ev: EventLike) -> None:
    vm.snapshots, vm.current_snapshot = remove_from_tree(vm.snapshots, vm.current_snapshot, ev.payload["id"])


# -- users and API keys (moldd/app/users.py) ---------------------------------------------------------------
# The log holds each user's role, API key and the SHA-256 of its secret key, never the secret itself.
@on("user.created")
def _user_created(model: ReadModel, ev: EventLike) -> None:
    p = ev.payload
    model.users[p["name"]] = {
        "name": p["name"], "id": p["id"], "role": p["role"], "apikey": p["apikey"],
        "key_fingerprint": p["key_fingerprint"], "state": "enabled", "created": _iso(ev), "updated": _iso(ev),
    }  # fmt: skip
    model.by_apikey[p["apikey"]] = p["name"]


@on("user.keys.registered")
def _user_keys(model: ReadModel, ev: EventLike) -> None:
    user = model.users.get(ev.payload["name"])
    if user is None:
        return
    model.by_apikey.pop(user["apikey"], None)
    user.update(apikey=ev.payload["apikey"], key_fingerprint=ev.payload["key_fingerprint"], updated=_iso(ev))
    user["state"] = "enabled"
    model.by_apikey[user["apikey"]] = user["name"]


@on("user.revoked")
def _user_revoked(model: ReadModel, ev: EventLike) -> None:
    user = model.users.get(ev.payload["name"])
    if user is None:
        return
    model.by_apikey.pop(user["apikey"], None)
    user.update(state="revoked", updated=_iso(ev))
