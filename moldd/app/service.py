"""The application: verbs in, checks against the read model, events out, then work through the adapters.

``App`` implements ``moldd.app.bus.CommandBus``. Every verb is a handler registered by the modules in
``moldd.app`` (lifecycle, operations, queries). A handler validates its args, checks the domain rules against the
read model under the VM's lock, appends the ``*.requested`` event (the acknowledgement point: once it is committed
the command is never lost), then runs the slow part as a tracked job whose outcome is appended too."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from events import ANY_VERSION, AppendResult, ConcurrencyError, NewEvent, StoredEvent
from moldd.app.args import show
from moldd.app.bus import SYSTEM, Actor, CommandReply
from moldd.app.ports import EventLog, Hosts
from moldd.app.projector import Projector
from moldd.app.secrets import SecretStore
from moldd.config import Config
from moldd.domain.errors import Conflict, MolddError, NotFound, PermissionDenied, ValidationError
from moldd.domain.ha import HostHealth
from moldd.domain.ids import is_uuid, new_hex_id, stable_uuid
from moldd.domain.names import check_safe_text
from moldd.domain.roles import Role, required_role
from moldd.domain.states import VMState
from moldd.eventtypes import cloudstack_event
from moldd.projection.model import VM
from moldd.projection.readmodel import ReadModel

log = structlog.get_logger("moldd.app")


FOLLOW_PAGE = 50  # log entries a follower reads from the store (and writes to its client) at a time
REPLY_CACHE = 4096  # finished client command ids whose first reply is kept in memory (older: rebuilt from the log)
BINDING_KEY = "_command"  # in the payload of a command's first event: what its id is bound to


class IdReused(Conflict):
    code = "id_reused"


@dataclass(frozen=True)
class CommandBinding:
    """What a client command id is bound to: who sent it, the verb and a digest of the args."""

    verb: str
    actor: str  # "uid=N" or an internal actor's name; not the pid (a retry may come from another process)
    args_sha256: str
    position: int | None = None  # of the first command's event, when known

    @classmethod
    def of(cls, verb: str, args: Mapping[str, Any], actor: Actor) -> CommandBinding:
        canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
        return cls(verb, _actor_key(actor), hashlib.sha256(canonical.encode("utf-8", "replace")).hexdigest())

    @classmethod
    def recorded(cls, ev: StoredEvent) -> CommandBinding | None:
        """The binding stored with a command's first event (``None`` for events written before bindings)."""
        raw = ev.payload.get(BINDING_KEY) if isinstance(ev.payload, dict) else None
        if not isinstance(raw, dict):
            return None
        return cls(str(raw.get("verb")), str(raw.get("actor")), str(raw.get("args_sha256")), ev.position)

    def to_payload(self) -> dict[str, str]:
        return {"verb": self.verb, "actor": self.actor, "args_sha256": self.args_sha256}

    def check(self, command_id: str, other: CommandBinding) -> None:
        """Refuse ``other`` when this (first) command's binding differs from it."""
        if (self.verb, self.actor, self.args_sha256) == (other.verb, other.actor, other.args_sha256):
            return
        what = "different arguments" if (self.verb, self.actor) == (other.verb, other.actor) else (
            f"{other.verb} by {other.actor}"
        )
        at = f" (log position {self.position})" if self.position else ""
        raise IdReused(
            f"command id {command_id!r} was already used for {self.verb} by {self.actor}{at}; this request "
            f"({what}) needs a new id",
            field="id",
        )


def _actor_key(actor: Actor) -> str:
    """Who an id belongs to: the Unix uid (not the pid: a retry may come from another process), the moldd user
    of a signed request, or the internal actor."""
    if actor.internal is not None:
        return actor.internal
    if actor.via is not None:
        return f"user={actor.user} via={actor.via}"
    return f"uid={actor.uid}"


@dataclass(frozen=True)
class Command:
    """One client command: ``id`` is the client's id (or a generated one) and doubles as the job id."""

    id: str
    verb: str
    actor: Actor
    args: Mapping[str, Any]
    binding: CommandBinding | None = None  # set for client-given ids; recorded with the first event


Handler = Callable[["App", Command], Awaitable[CommandReply]]
READ_VERB_PREFIXES = ("list", "query")
"""Verbs a standby answers (from its read model); every other verb needs the cluster's leader."""
_REGISTRY: dict[str, Handler] = {}


def verb(name: str) -> Callable[[Handler], Handler]:
    """Register a handler for a CloudStack/Mold API verb."""

    def register(fn: Handler) -> Handler:
        _REGISTRY[name] = fn
        return fn

    return register


def event_view(ev: StoredEvent) -> dict[str, Any]:
    cloudstack = cloudstack_event(ev.event_type)
    return {
        "cloudstack_type": cloudstack[0] if cloudstack else None,  # VM.START, VM.CREATE, ... (CloudStack's names)
        "cloudstack_state": cloudstack[1] if cloudstack else None,  # Scheduled / Started / Completed / Error
        "position": ev.position,
        "stream_id": ev.stream_id,
        "stream_version": ev.stream_version,
        "event_type": ev.event_type,
        "schema_version": ev.schema_version,
        "recorded_at": ev.recorded_at.isoformat(),
        "actor": ev.actor,
        "command_id": ev.command_id,
        "causation_id": ev.causation_id,
        "correlation_id": ev.correlation_id,
        "payload": ev.payload,
    }


_CATALOG = {
    "offering": ("service offering", "offerings"),
    "template": ("template", "templates"),
    "iso": ("ISO", "isos"),
    "host": ("host", "hosts"),
}


def catalog_item(config: Config, kind: str, name: str, field: str | None = None) -> Any:
    """The configured offering, template, ISO or host called ``name`` or known by its stable id
    (moldd.domain.ids, as CloudStack clients name it); NotFound names the known ones."""
    label, attr = _CATALOG[kind]
    items = getattr(config, attr)
    for item in items:
        if item.name == name:
            return item
    if is_uuid(name):
        for item in items:
            if stable_uuid(kind, item.name) == name:
                return item
    known = ", ".join(i.name for i in items) or "none configured"
    raise NotFound(f"no {label} {name!r} (known: {known})", field=field or kind)


class Claim:
    """A VM's lock held by a verb (:meth:`App.claim`)."""

    def __init__(self, app: App, name: str, lock: asyncio.Lock) -> None:
        self.app = app
        self.name = name
        self._lock = lock
        self.kept = False

    @property
    def vm(self) -> VM:
        """The VM as the read model has it now (under the lock: as the command's checks must see it)."""
        return self.app.model.vms[self.name]

    def keep_for_job(self, job_id: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as the command's job and hand it the lock: a start or stop sent meanwhile waits for the job
        to end, then checks again (for jobs that work on the disk or the domain of a VM whose state they keep)."""
        if self.kept:
            coro.close()
            raise RuntimeError(f"the lock of {self.name} is already kept for a job")
        lock = self._lock

        async def run() -> None:
            try:
                await coro
            finally:
                lock.release()

        self.app.spawn_job(job_id, self.name, run())
        self.kept = True  # after the spawn: had it failed, the block's end releases the lock


class App:
    def __init__(self, config: Config, store: EventLog, projector: Projector, hosts: Hosts) -> None:
        self.config = config
        self.store = store
        self.projector = projector
        self.hosts = hosts  # moldd.app.hosts.HostManager in the daemon
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.placement_lock = asyncio.Lock()
        self.secrets = SecretStore.for_config(config)  # secret settings: kept beside the log, never in it
        self.jobs: dict[str, asyncio.Task[None]] = {}  # job id -> task
        self.vm_jobs: dict[str, str] = {}  # vm name -> job id running in this process
        self.migrations: dict[str, str] = {}  # vm name -> destination of a migration this process is running
        self.background: set[asyncio.Task[Any]] = set()
        self.health_checks: dict[str, Callable[[], bool]] = {}
        self.clock: Callable[[], float] = time.time
        # client command id -> (binding, the one execution); finished ids keep their first reply (bounded)
        self.inflight: dict[str, tuple[CommandBinding, asyncio.Future[tuple[CommandReply, bool]]]] = {}
        self.replies: dict[str, tuple[CommandBinding, CommandReply]] = {}
        self.on_command: Callable[[str, str, float], None] | None = None  # metrics: (verb, outcome, seconds)
        self.followers = 0  # clients following the log live (async_follow, the status page's feed)
        self.cluster: Any = None  # moldd.cluster.ClusterRole when several moldd share a PostgreSQL log

    @property
    def model(self) -> ReadModel:
        return self.projector.model

    # -- CommandBus ------------------------------------------------------------------------------------
    def verbs(self) -> list[str]:
        return sorted(_REGISTRY)

    async def async_dispatch(
        self, verb: str, args: Mapping[str, Any], command_id: str | None, actor: Actor
    ) -> CommandReply:
        """Run one command. A command ``id`` is executed at most once: a request whose id is in flight waits for
        that one execution and gets its reply; a finished id returns the first result; an id bound to another
        actor, verb or args is refused (409 ``id_reused``, naming the first command)."""
        handler = _REGISTRY.get(verb)
        if handler is None:
            raise ValidationError(f"unknown command {verb!r}", field="command", code="unknown_command")
        if actor.role is not None and actor.role != "admin":  # an admin may call every verb
            await self._async_check_role(verb, actor)
        if command_id is None:
            cmd = Command(id=new_hex_id(), verb=verb, actor=actor, args=args or {})
            return await self._async_execute(handler, cmd)
        binding = CommandBinding.of(verb, args or {}, actor)
        running = self.inflight.get(command_id)
        if running is None:
            done = self.replies.get(command_id)
            if done is not None:
                done[0].check(command_id, binding)
                return self._duplicate(done[1])
            # Registered before the first await: every later request with this id finds it.
            running = (binding, asyncio.ensure_future(self._async_once(handler, command_id, binding, args, actor)))
            self.inflight[command_id] = running
            running[1].add_done_callback(functools.partial(self._finished, command_id))
            first = True
        else:
            running[0].check(command_id, binding)
            first = False
        # shield: a client that goes away does not cancel the one execution the others wait for
        reply, duplicate = await asyncio.shield(running[1])
        return self._duplicate(reply) if (duplicate or not first) else reply

    def _finished(self, command_id: str, fut: asyncio.Future[Any]) -> None:
        self.inflight.pop(command_id, None)
        if not fut.cancelled():
            fut.exception()  # retrieved here too: every requester of this id may have gone away

    async def _async_once(
        self, handler: Handler, command_id: str, binding: CommandBinding, args: Mapping[str, Any], actor: Actor
    ) -> tuple[CommandReply, bool]:
        """The one execution of a client command id: (reply, whether it was a replay of a finished command)."""
        previous = await self.store.async_find_command(command_id)
        if previous is not None:
            recorded = CommandBinding.recorded(previous.events[0])
            if recorded is not None:
                recorded.check(command_id, binding)
            reply = self.replay_reply(previous)
            return reply, True
        cmd = Command(id=command_id, verb=binding.verb, actor=actor, args=args or {}, binding=binding)
        reply = await self._async_execute(handler, cmd)
        self.replies[command_id] = (binding, reply)
        while len(self.replies) > REPLY_CACHE:
            self.replies.pop(next(iter(self.replies)))
        return reply, False

    def _duplicate(self, reply: CommandReply) -> CommandReply:
        """The first execution's reply, marked as a duplicate, with its job as it is now."""
        result = reply.result
        if isinstance(result, dict):
            result = {**result, "duplicate": True}
            job = result.get("job")
            if isinstance(job, dict) and job.get("id") in self.model.jobs:
                result["job"] = self.job_view(job["id"])
        return CommandReply(result=result, position=reply.position)

    async def _async_execute(self, handler: Handler, cmd: Command) -> CommandReply:
        structlog.contextvars.bind_contextvars(command_id=cmd.id, actor=str(cmd.actor))
        started, outcome = time.perf_counter(), "internal"
        try:
            if self.cluster is not None and not cmd.verb.startswith(READ_VERB_PREFIXES):
                self.cluster.check_leading()  # a standby refuses new writes (NotLeader names the leader)
            reply = await self._async_run_checked(handler, cmd)
            outcome = "ok"
            return reply
        except MolddError as exc:
            outcome = exc.code
            log.info("command_refused", verb=cmd.verb, code=exc.code, field=exc.field, reason=exc.message)
            raise
        finally:
            structlog.contextvars.unbind_contextvars("command_id", "actor")
            if self.on_command is not None:
                self.on_command(cmd.verb, outcome, time.perf_counter() - started)

    async def _async_check_role(self, verb: str, actor: Actor) -> None:
        """Refuse a verb the actor's role does not allow, and record who tried what and why."""
        try:
            role = Role.parse(actor.role or "")
        except ValidationError:
            role = None
        need = required_role(verb)
        if role is not None and role >= need:
            return
        reason = f"role {actor.role} may not call {verb} (it needs {need})"
        log.warning("access_denied", verb=verb, actor=str(actor), reason=reason)
        with contextlib.suppress(Exception):  # the refusal stands even if the audit cannot be written
            await self.store.async_append(
                "access",
                [
                    NewEvent(
                        "access.denied",
                        {"verb": verb, "user": actor.user, "uid": actor.uid, "role": actor.role,
                         "required": str(need), "via": actor.via or "socket", "reason": reason},
                        actor=str(actor),
                    )
                ],
            )  # fmt: skip
        raise PermissionDenied(reason, field="command")

    async def _async_run_checked(self, handler: Handler, cmd: Command, attempts: int = 3) -> CommandReply:
        """Run a handler; if another event for the same stream (a libvirt event, say) was committed between its
        check and its append, nothing of the command was written: let the projection catch up and decide again."""
        for attempt in range(attempts):
            try:
                return await handler(self, cmd)
            except ConcurrencyError as exc:
                head, _ = await self.store.async_head()
                await self.projector.async_wait(head)
                if attempt == attempts - 1:
                    raise Conflict(
                        f"{exc.stream_id} kept changing while this command was being checked; retry it", field="id"
                    ) from None
        raise AssertionError("unreachable")

    def replay_reply(self, previous: AppendResult) -> CommandReply:
        """A retried command id: answer with what the first attempt started (its job as it is now)."""
        first = previous.events[0]
        job = self.model.jobs.get(first.correlation_id or "")
        vm = self.model.vms.get(first.stream_id.removeprefix("vm-"))
        result: dict[str, Any] = {"duplicate": True}
        if job is not None:
            result["job"] = self.job_view(job.id)
        if vm is not None:
            result["vm"] = vm.to_dict()
        if first.stream_id.startswith("group-"):
            group = self.model.groups.get(first.stream_id.removeprefix("group-"))
            result["group"] = (
                group.to_dict() if group else {"name": first.payload.get("name"), "deleted": True}
            )
        return CommandReply(result=result, position=previous.last_position)

    def health(self) -> dict[str, Any]:
        checks = {name: bool(check()) for name, check in self.health_checks.items()}
        checks["projection"] = self.projector.running
        hosts = {}
        if self.hosts is not None:
            hosts = {h.name: {"link": h.link, "health": h.health} for h in self.model.hosts.values()}
        alerts = [
            f"host {h.name} is {h.health}: {h.health_cause}"
            for h in self.model.hosts.values()
            if h.health in (HostHealth.FENCE_FAILED, HostHealth.DOWN, HostHealth.FENCING)
        ]
        out = {
            "ok": all(checks.values()),
            "checks": checks,
            "position": self.model.position,
            "hosts": hosts,
            "alerts": alerts,
        }
        if self.cluster is not None:
            out |= self.cluster.info()  # role, node, leader, epoch, acting
        return out

    async def async_follow(
        self, from_position: int, *, stream: str | None = None, correlation: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Log entries from ``from_position`` on, one at a time (see :meth:`async_follow_pages`)."""
        async for page in self.async_follow_pages(from_position, stream=stream, correlation=correlation):
            for entry in page:
                yield entry

    async def async_follow_pages(
        self, from_position: int, *, stream: str | None = None, correlation: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Log entries from ``from_position`` on (only a ``stream``'s, or only those of a ``correlation`` id:
        its ``*.requested`` event and its outcomes), then live, in pages. The past is read ``FOLLOW_PAGE``
        entries at a time (the correlation filter through the store's index) and at most ``follower_buffer`` live
        events wait for a slow follower, so a follower holds a bounded amount of memory however far back it
        starts; a page is handed over whole (one write to the client, not one per entry)."""
        self.followers += 1
        try:
            position = max(1, from_position)
            page_size = FOLLOW_PAGE
            version = 1  # a stream is read through its (stream_id, stream_version) index
            while True:  # catch up
                indexed = correlation is not None or stream is not None
                head = (await self.store.async_head())[0] if indexed else None
                if correlation is not None:
                    page = await self.store.async_read_correlated(correlation, position, page_size)
                elif stream is not None:
                    page = await self.store.async_read_stream(stream, version, version + page_size - 1)
                    version += page_size
                else:
                    page = await self.store.async_read(position, limit=page_size)
                views = [
                    event_view(ev)
                    for ev in page
                    if ev.position >= position and (stream is None or ev.stream_id == stream)
                ]
                if views:
                    yield views
                if page:
                    position = max(position, page[-1].position + 1)
                if len(page) < page_size:
                    if head is not None:
                        position = max(position, head + 1)  # everything up to head was matched above
                    break
                page = []  # drop the page before the next read
            limit = self.config.api.follower_buffer
            async for ev in self.store.async_subscribe(
                from_position=position, batch_size=page_size, queue_limit=limit
            ):
                if (stream is None or ev.stream_id == stream) and (
                    correlation is None or correlation in (ev.correlation_id, ev.command_id)
                ):
                    yield [event_view(ev)]
        finally:
            self.followers -= 1

    # -- helpers for handlers --------------------------------------------------------------------------
    def catalog(self, kind: str, name: str, field: str | None = None) -> Any:
        """The configured offering, template, ISO or host called ``name`` (see :func:`catalog_item`)."""
        return catalog_item(self.config, kind, name, field)

    def get_vm(self, args: Mapping[str, Any], field: str = "id", *, expunged: bool = False) -> VM:
        """Find a VM by its VM name, numeric id, internal name, or (if unique) display name."""
        key = args.get(field)
        if key is None and field == "id":
            key = args.get("name") or args.get("virtualmachineid")
        if key is None or (not isinstance(key, (str, int)) or isinstance(key, bool)):
            got = "" if key is None else f", got {show(key)}"
            raise ValidationError(f"{field} is required: the VM name (or its numeric id){got}", field=field)
        if isinstance(key, str):
            if not key.strip() or len(key) > 255:
                raise ValidationError(f"{field} must be a VM name of 1 to 255 characters, got {show(key)}", field=field)
            check_safe_text(key, field)
        vms = self.model.vms
        vm = vms.get(str(key)) or self.model.vm_by_domain(str(key))
        if vm is None and isinstance(key, str) and len(key) == 36:  # a CloudStack id: the VM's UUID
            vm = next((v for v in vms.values() if v.uuid == key), None)
        if vm is None:
            by_id = [v for v in vms.values() if str(v.id) == str(key)]
            by_display = [v for v in vms.values() if v.display_name == key and v.state != VMState.EXPUNGED]
            if by_id:
                vm = by_id[0]
            elif len(by_display) == 1:
                vm = by_display[0]
            elif len(by_display) > 1:
                raise Conflict(f"display name {key!r} is not unique: use the VM name", field=field)
        if vm is None or (vm.state == VMState.EXPUNGED and not expunged):
            raise NotFound(f"no VM {key!r}", field=field)
        return vm

    async def async_append(
        self,
        stream: str,
        events: list[NewEvent],
        *,
        expected_version: int = ANY_VERSION,
        command_id: str | None = None,
    ) -> AppendResult:
        """Append and wait until the read model has folded it, so the next check sees it. The event that
        acknowledges a client command (``command_id``) records what the id is bound to (verb, actor, args)."""
        running = self.inflight.get(command_id) if command_id is not None else None
        if running is not None and events:
            first = events[0]
            events = [
                dataclasses.replace(first, payload={**first.payload, BINDING_KEY: running[0].to_payload()}),
                *events[1:],
            ]
        await self.secrets.async_flush()  # a cluster: a secret sealed for these events is shared before them
        res: AppendResult = await self.store.async_append(
            stream, events, expected_version=expected_version, command_id=command_id
        )
        await self.projector.async_wait(res.last_position)
        return res

    async def async_record(
        self,
        vm: VM | str,
        event_type: str,
        payload: dict[str, Any],
        *,
        cmd: Command | None = None,
        job: str | None = None,
        actor: Actor | str | None = None,
        first: bool = False,
    ) -> AppendResult:
        """Append one event on a VM's stream. ``first=True`` marks the event that acknowledges ``cmd``: it carries
        the command id (idempotency) and must find the stream at the version the checks saw."""
        name = vm if isinstance(vm, str) else vm.name
        who = str(actor or (cmd.actor if cmd else SYSTEM))
        ev = NewEvent(
            event_type,
            payload,
            actor=who,
            causation_id=cmd.id if cmd else None,
            correlation_id=job or (cmd.id if cmd else None),
        )
        expected = vm.version if (first and not isinstance(vm, str)) else ANY_VERSION
        return await self.async_append(
            f"vm-{name}", [ev], expected_version=expected, command_id=cmd.id if (first and cmd) else None
        )

    @contextlib.asynccontextmanager
    async def claim(self, name: str) -> AsyncIterator[Claim]:
        """The one lock idiom of verbs: ``async with app.claim(vm.name) as claim:`` holds the VM's lock; inside,
        ``claim.vm`` is the VM as it is now (check against it, then append the event that acknowledges the
        command). The lock is released when the block ends (a refusal included), unless
        :meth:`Claim.keep_for_job` handed it to the command's job, which then holds it until it ends."""
        lock = self.locks[name]
        await lock.acquire()
        claim = Claim(self, name, lock)
        try:
            yield claim
        finally:
            if not claim.kept:
                lock.release()

    def spawn_job(self, job_id: str, vm: str | None, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(self._async_run_job(job_id, vm, coro), name=f"job-{job_id}")
        self.jobs[job_id] = task
        if vm is not None:
            self.vm_jobs[vm] = job_id

    async def _async_run_job(self, job_id: str, vm: str | None, coro: Coroutine[Any, Any, Any]) -> None:
        structlog.contextvars.bind_contextvars(command_id=job_id, vm=vm)
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job_crashed", job=job_id)
            crashed = True
        else:
            crashed = False
        finally:
            self.jobs.pop(job_id, None)
            if vm is not None and self.vm_jobs.get(vm) == job_id:
                self.vm_jobs.pop(vm, None)
        if crashed and vm is not None:
            # Every job ends with an outcome carrying job_status, and a crash must not leave the VM Starting,
            # Stopping, ... until the next daemon start: record the failure with what libvirt shows now.
            try:
                await self.hosts.async_after_crash(vm, job_id)
            except Exception:
                log.exception("job_crash_not_recorded", job=job_id)

    def busy(self, vm: str) -> bool:
        """A command of this daemon is working on the VM right now."""
        return vm in self.vm_jobs or self.locks[vm].locked()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def job_view(self, job_id: str) -> dict[str, Any]:
        job = self.model.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="jobid")
        view = job.to_dict()
        view["status"] = job.status
        return view

    def job_reply(self, job_id: str, vm: VM | None, position: int) -> CommandReply:
        vm_now = self.model.vms.get(vm.name) if vm else None
        return CommandReply(
            result={"job": self.job_view(job_id), "vm": vm_now.to_dict() if vm_now else None},
            position=position,
        )

    async def async_close(self, grace_s: float = 10.0) -> None:
        """Let running jobs finish (they carry acknowledged commands) for ``grace_s``, then cancel the rest;
        whatever was cut short is reconciled with libvirt at the next start."""
        pending = [*self.jobs.values()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for task in [*self.jobs.values(), *self.background]:
            task.cancel()
        for task in [*self.jobs.values(), *self.background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
