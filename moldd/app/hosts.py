"""The hosts as the daemon sees them: one self-healing libvirt connection each, every domain event and link
change appended to the log, and a resync after every (re)connect that records what changed meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from events import ANY_VERSION, NewEvent
from moldd.config import Config
from moldd.domain.errors import MolddError, Unavailable, present
from moldd.domain.reconcile import is_on, reconcile
from moldd.domain.states import TRANSIENT, VMState
from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.events import DomainEvent, HostLinkEvent
from moldd.libvirt.host import HostConnection
from moldd.projection.model import VM

if TYPE_CHECKING:
    from moldd.app.service import App

log = structlog.get_logger("moldd.hosts")


class HostManager:
    def __init__(self, config: Config, bridge: LibvirtBridge) -> None:
        self.config = config
        self.bridge = bridge
        self._app: App | None = None  # set by attach(); it appends through the app so it waits for the projection
        self.conns: dict[str, HostConnection] = {}
        self._queue: asyncio.Queue[DomainEvent | HostLinkEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.synced: dict[str, asyncio.Event] = {}
        self.ingested = 0

    def attach(self, app: App) -> None:
        self._app = app

    @property
    def app(self) -> App:
        return present(self._app, "the host manager's app (attach() first)")

    # -- lifecycle -------------------------------------------------------------------------------------
    async def async_start(self) -> None:
        self.bridge.start()
        self._queue = asyncio.Queue()  # started again after a take-over: nothing of an earlier term
        self.conns = {}
        self.synced = {}
        for h in self.config.hosts:
            self.synced[h.name] = asyncio.Event()
            self.conns[h.name] = HostConnection(
                h.name,
                h.uri,
                self.bridge,
                self._queue.put_nowait,
                self._queue.put_nowait,
                keepalive=(self.config.ha.keepalive_interval_s, self.config.ha.keepalive_count),
            )
        self._task = asyncio.create_task(self._async_ingest(), name="libvirt-ingest")
        await asyncio.gather(*(c.async_start() for c in self.conns.values()))

    async def async_wait_synced(self, timeout: float) -> list[str]:
        """Wait until every reachable host has been resynced once; returns the hosts that were not."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for name, ev in self.synced.items():
                    if self.conns[name].connected:
                        await ev.wait()
        return [name for name, ev in self.synced.items() if not ev.is_set()]

    async def async_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in self.conns.values():
            with contextlib.suppress(Exception):
                await conn.async_stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- access ----------------------------------------------------------------------------------------
    def conn(self, name: str | None) -> HostConnection:
        conn = self.conns.get(name or "")
        if conn is None:
            raise Unavailable(f"no host {name!r}", field="host")
        if not conn.connected:
            raise Unavailable(f"host {name} is not connected", field="host")
        return conn

    def is_connected(self, name: str) -> bool:
        conn = self.conns.get(name)
        return conn is not None and conn.connected

    async def async_forget_domain(self, host: str, domain: str) -> None:
        """Remove a stale, stopped definition of a domain that now lives on another host."""
        with contextlib.suppress(MolddError):
            conn = self.conn(host)
            if not is_on(await conn.async_domain_state(domain)):
                await conn.async_undefine(domain)

    # -- ingestion -------------------------------------------------------------------------------------
    async def _async_ingest(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, DomainEvent):
                    await self._async_ingest_domain_event(item)
                else:
                    await self._async_ingest_link(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingest_failed", item=repr(item))

    async def _async_ingest_domain_event(self, ev: DomainEvent) -> None:
        vm = self.app.model.vm_by_domain(ev.domain)
        stream = f"vm-{vm.name}" if vm else f"host-{ev.host}"
        payload = ev.to_payload() | {"host": ev.host}
        if vm is None:
            payload["unknown_domain"] = True
        await self.app.async_append(stream, [NewEvent("libvirt.domain_event", payload, actor="libvirt")])
        self.ingested += 1
        log.info("domain_event", vm=vm.name if vm else None, host=ev.host, lv_event=ev.event, lv_detail=ev.detail)

    async def _async_ingest_link(self, ev: HostLinkEvent) -> None:
        known = self.app.model.hosts.get(ev.host)
        if ev.kind == "reconnect_failed" and known is not None and known.link == "disconnected":
            log.debug("host_still_unreachable", host=ev.host, reason=ev.reason)
            return  # one record per outage, not one per retry
        await self.app.async_append(
            f"host-{ev.host}", [NewEvent("host.link", ev.to_payload() | {"host": ev.host}, actor="libvirt")]
        )
        log.info("host_link", host=ev.host, kind=ev.kind, reason=ev.reason)
        if ev.kind == "connected":
            self.app.spawn(self.async_resync(ev.host), name=f"resync-{ev.host}")

    # -- resync ----------------------------------------------------------------------------------------
    async def async_resync(self, host: str) -> None:
        """Compare every domain on ``host`` with the log and record each difference as a fact."""
        try:
            domains = {d.name: d for d in await self.conn(host).async_list_domains()}
        except MolddError as exc:
            log.warning("resync_failed", host=host, reason=exc.message)
            return
        app = self.app
        for vm in list(app.model.vms.values()):
            if vm.state in (VMState.EXPUNGED,):
                continue
            dom = domains.get(vm.internal_name)
            if vm.host != host:
                if dom is not None and is_on(dom.state):
                    if vm.state == VMState.RUNNING:
                        await self._async_stale_copy(host, vm, dom.state)
                        if dom.persistent:  # its definition too, as for a copy found already shut off
                            await self._async_stale_definition(host, vm.name)
                    elif vm.state in (VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN) and not app.busy(vm.name):
                        await self._async_adopt(host, vm, dom.state)
                elif dom is not None and dom.persistent and vm.host is not None:
                    await self._async_stale_definition(host, vm.name)
                continue
            lock = app.locks.get(vm.name)
            if (lock is None or not lock.locked()) and reconcile(
                VMState(vm.state), dom.state if dom else None, stale_job=vm.name not in app.vm_jobs
            ) is None:
                continue  # the lock is free and the log agrees: what the locked check below would find, with no
                # lock object made for each of 100,000 VMs at every start
            async with app.locks[vm.name]:
                vm = app.model.vms[vm.name]
                stale = vm.name not in app.vm_jobs
                dom = domains.get(vm.internal_name)
                finding = reconcile(VMState(vm.state), dom.state if dom else None, stale_job=stale)
                if finding is None:
                    continue
                # The listing is as old as this resync, and events were ingested since: check again, now.
                try:
                    domain_state = await self.conn(host).async_domain_state(vm.internal_name)
                except MolddError as exc:
                    log.warning("resync_failed", host=host, vm=vm.name, reason=exc.message)
                    return
                vm = app.model.vms[vm.name]
                await self._async_record_finding(vm, host, domain_state, stale=vm.name not in app.vm_jobs)
        self.synced[host].set()

    async def _async_record_finding(
        self, vm: VM, host: str, domain_state: str | None, *, stale: bool, crashed: bool = False
    ) -> bool:
        """Record what libvirt shows of ``vm`` on ``host`` if the log disagrees (the caller holds the VM's lock).
        ``stale``: no command of this daemon is working on it; its job (if any) is recorded as failed."""
        finding = reconcile(VMState(vm.state), domain_state, stale_job=stale)
        if finding is None:
            return False
        payload: dict[str, Any] = {
            "state": str(finding.state),
            "power_state": finding.power_state,
            "host": host,
            "domain_state": domain_state,
            "reason": finding.reason,
            "stop_cause": finding.stop_cause,
            "was": vm.state,
        }
        if stale and vm.job:
            error = {"code": "internal" if crashed else "interrupted", "message": finding.reason}
            payload |= {"job_status": "failed", "error": error}
        await self.app.async_append(
            f"vm-{vm.name}",
            [NewEvent("vm.reconciled", payload, actor="system", correlation_id=vm.job if stale else None)],
            expected_version=ANY_VERSION,
        )
        log.warning(
            "vm_reconciled", vm=vm.name, host=host, was=vm.state, now=str(finding.state), why=finding.reason
        )
        return True

    async def async_after_crash(self, name: str, job: str) -> None:
        """A job crashed (a bug, not a refusal): record its failure, and what libvirt shows of the VM now so it is
        not left in the in-progress state the job put it in. The caller has no lock and no job entry left."""
        app = self.app
        async with app.locks[name]:
            vm = app.model.vms.get(name)
            if vm is None:
                return
            if vm.job == job and vm.host is not None:
                try:
                    domain_state = await self.conn(vm.host).async_domain_state(vm.internal_name)
                except MolddError:
                    domain_state = None
                    if VMState(vm.state) in TRANSIENT:
                        await app.async_append(
                            f"vm-{name}",
                            [NewEvent("vm.reconciled", {
                                "state": "Unknown", "power_state": "unknown", "host": vm.host,
                                "domain_state": None, "was": vm.state,
                                "reason": f"the job crashed while {vm.state} and host {vm.host} does not answer",
                                "job_status": "failed",
                                "error": {"code": "internal", "message": "the job crashed"},
                            }, actor="system", correlation_id=job)],
                        )  # fmt: skip
                        return
                else:
                    if await self._async_record_finding(vm, vm.host, domain_state, stale=True, crashed=True):
                        return
            await app.async_append(
                f"vm-{name}",
                [NewEvent(
                    "vm.job.crashed",
                    {"job_status": "failed", "error": {"code": "internal", "message": "the job crashed"}},
                    actor="system", correlation_id=job,
                )],
            )  # fmt: skip

    async def _async_adopt(self, host: str, vm: VM, domain_state: str) -> None:
        """The only running copy of a VM is on a host the log did not place it on (a host came back whose guests
        survived while moldd had given them up): the hypervisor is the truth for power, so record where it runs."""
        async with self.app.locks[vm.name]:
            payload = {
                "state": "Running",
                "power_state": "on",
                "host": host,
                "domain_state": domain_state,
                "reason": f"found running on {host} while the log had it {vm.state} on {vm.host}",
                "stop_cause": None,
                "was": vm.state,
            }
            await self.app.async_append(f"vm-{vm.name}", [NewEvent("vm.reconciled", payload, actor="system")])
        log.warning("vm_adopted", vm=vm.name, host=host, was=vm.state, log_host=vm.host)

    async def _async_stale_definition(self, host: str, name: str) -> None:
        """A shut-off definition of a VM that lives on another host now (HA moved it while this host was away):
        undefine it, so a later resync or start cannot mistake it for the VM, and record that."""
        app = self.app
        if app.busy(name):
            return
        async with app.locks[name]:
            vm = app.model.vms[name]
            if vm.host in (None, host) or VMState(vm.state) in TRANSIENT or vm.state == VMState.EXPUNGED:
                return
            try:
                conn = self.conn(host)
                state = await conn.async_domain_state(vm.internal_name)
                if state is None or is_on(state):
                    return  # gone meanwhile, or started: the stale-copy rule handles a running one
                await conn.async_undefine(vm.internal_name)
            except MolddError as exc:
                log.warning("stale_definition_not_removed", vm=name, host=host, reason=exc.message)
                return
            await app.async_append(
                f"vm-{name}",
                [NewEvent(
                    "vm.stale_definition_removed",
                    {"host": host, "current_host": vm.host, "domain_state": state},
                    actor="system",
                )],
            )  # fmt: skip
        log.warning("stale_definition_removed", vm=name, host=host, current_host=vm.host)

    async def _async_stale_copy(self, host: str, vm: VM, domain_state: str) -> None:
        """A copy of a VM runs on a host that is not its current one (a host came back after its VMs were
        restarted elsewhere without fencing having killed them). Two copies corrupt the disk: stop the stale one."""
        conn = self.conn(host)
        with contextlib.suppress(MolddError):
            await conn.async_destroy(vm.internal_name)
        await self.app.async_append(
            f"vm-{vm.name}",
            [
                NewEvent(
                    "vm.stale_copy_destroyed",
                    {"host": host, "current_host": vm.host, "domain_state": domain_state},
                    actor="system",
                )
            ],
        )
        log.error("stale_copy_destroyed", vm=vm.name, host=host, current_host=vm.host)
