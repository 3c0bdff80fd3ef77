"""HA watchers: restart HA VMs that went down, move the VMs of a failed host after fencing, never start a VM twice.

Fed only by the log: a projector listener sees each event after it is folded and queues work; the work itself runs
in supervised tasks. A crash — of a watcher's loop, of a VM's HA job or of a host's handling — is logged,
recorded (``ha.watcher_restarted``) and the watcher goes on; ``healthy()`` turns false when a watcher is dead or
crash-loops (``CRASH_LOOP`` crashes in a row with no piece of work done in between) and true again once it does a
piece of work without crashing. The socket's health and systemd's watchdog report it. Every decision is an ``ha.*`` or ``host.health`` event
carrying its cause (the log position and kind of event that led to it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from events import NewEvent, StoredEvent
from moldd.app.bus import HA
from moldd.app.lifecycle import async_start_on
from moldd.app.placement import place_existing
from moldd.app.service import App
from moldd.domain.errors import CapacityError, MolddError
from moldd.domain.ha import (
    DownCause,
    HostHealth,
    RestartLimits,
    evacuation_order,
    host_move_allowed,
    should_restart,
)
from moldd.domain.reconcile import is_on
from moldd.domain.states import VMState
from moldd.ha.decisions import (
    ON_HOST_STATES,
    SETTLED_STATES,
    HostWork,
    MoveCheck,
    NextStep,
    RestartOutcome,
    Trigger,
    after_attempt,
    catch_up_host,
    catch_up_vm,
    host_health,
    host_work,
    ineligible_reason,
    move_check,
    needs_fencing_step,
    parse_trigger,
    placement_why,
    plan_attempt,
    waits_for_a_host,
)
from moldd.ha.fencing import async_fence
from moldd.libvirt import storage
from moldd.projection.model import VM
from moldd.projection.readmodel import ReadModel

log = structlog.get_logger("moldd.ha")


class HAManager:
    JOB_WAIT_S = 60.0
    MAX_BLOCKED = 5  # attempts in a row failed by the host / a live copy, before waiting for a host to come up
    LOCK_GRACE_S = 10.0  # how long a disk may stay locked after a fence before the fence is called a liar
    CRASH_LOOP = 3  # crashes of one watcher in a row (no piece of work done in between) that make HA unhealthy
    WATCHERS = ("vm-watcher", "host-watcher")

    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.config.ha
        self.enabled = cfg.enabled
        self.limits = RestartLimits(cfg.backoff_base_s, cfg.backoff_cap_s, cfg.max_restarts, cfg.window_s)
        self.queue: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()  # (vm, cause, trigger position)
        self.host_queue: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()  # (host, kind, position)
        self.active: dict[str, asyncio.Task[None]] = {}  # one HA job per VM
        self.host_tasks: dict[str, asyncio.Task[None]] = {}  # one failure handler per host
        self.host_inbox: dict[str, asyncio.Queue[tuple[str, int]]] = {}
        self.host_workers: dict[str, asyncio.Task[None]] = {}
        self.host_phase: dict[str, str] = {}  # "grace" while a failure handler may still be called off
        self.supervised: dict[str, asyncio.Task[None]] = {}
        self._unlisten: Callable[[], None] = lambda: None  # the projector listener's unsubscribe handle (start())
        self.crashes = 0
        self.crashed_in_a_row: dict[str, int] = dict.fromkeys(self.WATCHERS, 0)  # reset by a piece of work done
        self.stats: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._unlisten = self.app.projector.add_listener(self._on_event)
        self._supervise("vm-watcher", self._async_vm_watcher)
        self._supervise("host-watcher", self._async_host_watcher)
        self._catch_up()

    def healthy(self) -> bool:
        """False when a watcher is dead or crash-looping (see the module's docstring)."""
        if not self.enabled:
            return True
        alive = all(not t.done() for t in self.supervised.values())
        return alive and all(n < self.CRASH_LOOP for n in self.crashed_in_a_row.values())

    async def _async_crashed(self, watcher: str, exc: Exception, **context: str) -> None:
        """A crash of ``watcher`` (its loop or one piece of its work): count it, log it, record it in the log."""
        self.crashes += 1
        self.crashed_in_a_row[watcher] = self.crashed_in_a_row.get(watcher, 0) + 1
        log.error("ha_watcher_crashed", watcher=watcher, in_a_row=self.crashed_in_a_row[watcher], exc_info=exc,
                  **context)  # fmt: skip
        with contextlib.suppress(Exception):
            await self.app.async_append(
                "daemon",
                [
                    NewEvent(
                        "ha.watcher_restarted",
                        {"watcher": watcher, "error": repr(exc)[:500], **context},
                        actor="ha",
                    )
                ],
            )

    async def _async_work(self, watcher: str, piece: Coroutine[Any, Any, None], **context: str) -> None:
        """One piece of ``watcher``'s work: a crash is counted and recorded (not raised), a success ends a crash
        loop."""
        try:
            await piece
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._async_crashed(watcher, exc, **context)
        else:
            self._worked(watcher)

    def _worked(self, watcher: str) -> None:
        """``watcher`` did a piece of work without crashing: it is not crash-looping."""
        if self.crashed_in_a_row.get(watcher):
            log.info("ha_watcher_recovered", watcher=watcher, after=self.crashed_in_a_row[watcher])
            self.crashed_in_a_row[watcher] = 0

    async def async_stop(self) -> None:
        self._unlisten()
        tasks = [
            *self.supervised.values(),
            *self.active.values(),
            *self.host_tasks.values(),
            *self.host_workers.values(),
        ]
        self.supervised.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _supervise(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a watcher forever: if it crashes, log it, record it in the log and start it again."""

        async def keeper() -> None:
            delay = 0.1
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await self._async_crashed(name, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        self.supervised[name] = asyncio.create_task(keeper(), name=f"ha-{name}")

    def _catch_up(self) -> None:
        """After a daemon restart: act on what happened while we were away."""
        if not self.enabled:
            return
        model = self.app.model
        for vm in model.vms.values():
            if catch_up_vm(vm):
                self.queue.put_nowait((vm.name, vm.stop_cause or "found-stopped", vm.position))
        for host in model.hosts.values():
            kind = catch_up_host(host_health(host.health), host.link, self.app.hosts.is_connected(host.name))
            if kind is not None:
                self.host_queue.put_nowait((host.name, kind, host.position))

    # -- the listener: runs inside the projector, after each event is folded; must not block -------------
    def _on_event(self, ev: StoredEvent, model: ReadModel) -> None:
        if not self.enabled:
            return
        t = ev.event_type
        if (t == "libvirt.domain_event" and ev.payload.get("event") == "STOPPED") or t == "vm.migrate.failed":
            vm = model.vms.get(ev.stream_id.removeprefix("vm-"))
            # The fold marks the VM Stopped (with a cause) only when moldd did not stop it itself.
            if vm is not None and vm.state == VMState.STOPPED and vm.down_at and vm.position == ev.position:
                self.stats[f"down:{vm.name}"] = ev.recorded_at.timestamp()
                self.queue.put_nowait((vm.name, vm.stop_cause or "other", ev.position))
        elif t == "vm.reconciled" and ev.payload.get("stop_cause"):
            self.queue.put_nowait((ev.stream_id.removeprefix("vm-"), ev.payload["stop_cause"], ev.position))
        elif t == "ha.restart.failed":
            self.queue.put_nowait((ev.stream_id.removeprefix("vm-"), "restart-failed", ev.position))
        elif t == "host.link":
            self.host_queue.put_nowait((ev.stream_id.removeprefix("host-"), ev.payload["kind"], ev.position))
        elif t == "host.health" and ev.payload.get("confirmed_by_operator"):
            self.host_queue.put_nowait((ev.stream_id.removeprefix("host-"), "operator-fenced", ev.position))
        elif t == "host.health" and ev.payload.get("to") == HostHealth.UP:
            # room (or the VM's own host) is back: VMs waiting for a place try again
            for vm in model.vms.values():
                if waits_for_a_host(vm):
                    self.queue.put_nowait((vm.name, "host-up", ev.position))

    # -- VM watcher ------------------------------------------------------------------------------------
    async def _async_vm_watcher(self) -> None:
        while True:
            name, cause, position = await self.queue.get()
            task = self.active.get(name)
            if task is not None and not task.done():
                continue  # one HA job per VM: the running one will see the newest state
            self.active[name] = asyncio.create_task(
                self._async_recover_vm(name, cause, position), name=f"ha-vm-{name}"
            )

    async def _async_recover_vm(self, name: str, cause: str, position: int) -> None:
        try:
            await self._async_work("vm-watcher", self._async_recover_vm_inner(name, cause, position), vm=name)
        finally:
            if self.active.get(name) is asyncio.current_task():
                self.active.pop(name, None)

    async def _async_ha_event(self, vm: str, event_type: str, payload: dict[str, Any]) -> None:
        await self.app.async_append(f"vm-{vm}", [NewEvent(event_type, payload, actor="ha")])

    async def _async_recover_vm_inner(self, name: str, cause: str, position: int) -> None:
        app = self.app
        vm = app.model.vms.get(name)
        if vm is None or ineligible_reason(vm) is not None:
            return
        trigger = parse_trigger(vm, cause, position)
        if not should_restart(vm.ha_enabled, trigger.policy, trigger.cause):
            await self._async_ha_event(
                name,
                "ha.not_restarted",
                trigger.to_payload()
                | {"policy": str(trigger.policy), "reason": f"policy {trigger.policy} keeps a {trigger.cause} VM down"},
            )
            return
        blocked = 0  # failed attempts in a row that were not the VM's fault (they do not use up its budget)
        while True:
            if await self._async_let_go_if_ineligible(name, trigger):
                return
            vm = app.model.vms[name]
            plan = plan_attempt(self.limits, vm.ha_restarts, app.clock(), blocked)
            if plan.give_up:
                await self._async_ha_event(
                    name,
                    "ha.gave_up",
                    trigger.to_payload()
                    | {
                        "reason": f"{plan.recent} restarts within {self.limits.window_s:g} s (limit "
                        f"{self.limits.max_restarts}): the VM keeps going down; fix it, then stop and start it by hand",
                        "restarts": plan.recent,
                    },
                )
                log.error("ha_gave_up", vm=name, restarts=plan.recent)
                return
            await self._async_ha_event(
                name, "ha.restart.scheduled", trigger.to_payload() | {"attempt": plan.attempt, "delay_s": plan.delay_s}
            )
            if plan.delay_s:
                await asyncio.sleep(plan.delay_s)
            outcome = await self._async_restart(name, trigger, plan.attempt)
            step, blocked = after_attempt(outcome, blocked, self.MAX_BLOCKED)
            if step is NextStep.LET_GO:
                # e.g. started by hand during the back-off: say why HA let go, so it is not left "pending"
                await self._async_let_go_if_ineligible(name, trigger)
                return
            if step is NextStep.DONE:
                return
            if step is NextStep.WAIT_FOR_HOST:
                await self._async_ha_event(
                    name, "ha.waiting",
                    trigger.to_payload() | {"reason": f"{blocked} attempts failed for reasons that are not the VM's "
                                            "(see ha.restart.failed): waiting for a host to come back up"},
                )  # fmt: skip
                return
            # RETRY: a failure is recorded (ha.restart.failed); go round (back-off grows with the count)

    async def _async_let_go_if_ineligible(self, name: str, trigger: Trigger) -> bool:
        """True when HA must leave the VM alone now; if HA still shows it pending, record why it lets go."""
        vm = self.app.model.vms.get(name)
        reason = ineligible_reason(vm)
        if reason is None:
            return False
        if vm is not None and vm.ha_status == "pending":
            await self._async_ha_event(name, "ha.cancelled", trigger.to_payload() | {"reason": reason})
        return True

    async def _async_restart(self, name: str, trigger: Trigger, attempt: int) -> RestartOutcome:
        """One attempt: place the VM, prove no copy of it still runs elsewhere, record the start and start it."""
        app = self.app
        async with app.claim(name):
            vm = app.model.vms.get(name)
            if vm is None or ineligible_reason(vm) is not None:
                return RestartOutcome.GONE
            old = vm.host
            async with app.placement_lock:
                try:
                    target = place_existing(
                        app.config, app.model, name, current=old, cluster=vm.cluster, reserved=app.migrations
                    )
                except CapacityError as exc:
                    # Not the VM's fault: it does not count against its restart budget. It waits for room (a host
                    # coming back Up wakes every waiting VM).
                    await self._async_ha_event(
                        name,
                        "ha.waiting",
                        trigger.to_payload() | {"attempt": attempt, "reason": f"waiting for capacity: {exc.message}"},
                    )
                    return RestartOutcome.WAITING
                refused = await self._async_check_move(vm, target.name, trigger)
                if refused is not None:
                    return refused
                await app.async_append(
                    f"vm-{name}",
                    [
                        NewEvent(
                            "ha.restart.started",
                            trigger.to_payload()
                            | {
                                "host": target.name,
                                "cluster": target.cluster,
                                "attempt": attempt,
                                "why": placement_why(target.name, old, target.cluster),
                                "from_host": old,
                            },
                            actor="ha",
                        )
                    ],
                    expected_version=vm.version,
                )
            blame: dict[str, Any] = {}
            ok = await async_start_on(
                app,
                name,
                target.name,
                actor=HA,
                ok_type="ha.restart.succeeded",
                fail_type="ha.restart.failed",
                extra={"attempt": attempt, "cause": str(trigger.cause)},
                blame=blame,
            )
        if ok:
            log.warning("ha_restarted", vm=name, host=target.name, cause=str(trigger.cause), attempt=attempt)
            return RestartOutcome.STARTED
        return RestartOutcome.FAILED if blame.get("counts", True) else RestartOutcome.BLOCKED

    async def _async_check_move(self, vm: VM, target: str, trigger: Trigger) -> RestartOutcome | None:
        """Never two copies: before ``vm`` starts on ``target`` away from its last host, that host must be fenced,
        or reachable and showing the domain off; and no process may still hold its disk. None when it may start,
        else the outcome that stops this attempt (its ``ha.*`` event recorded)."""
        app, name, old = self.app, vm.name, vm.host
        old_state = app.model.hosts.get(old) if old else None
        health = host_health(old_state.health if old_state else None)
        check = move_check(old, target, health, old is not None and app.hosts.is_connected(old))
        if check is MoveCheck.SAME_HOST or old is None:
            return None
        if check is MoveCheck.WAIT:
            await self._async_ha_event(
                name,
                "ha.waiting",
                trigger.to_payload() | {"reason": f"host {old} is {health} and not fenced: not starting it elsewhere"},
            )
            return RestartOutcome.WAITING
        if check is MoveCheck.ASK_OLD_HOST:
            try:
                state = await app.hosts.conn(old).async_domain_state(vm.internal_name)
            except MolddError as exc:
                await self._async_ha_event(
                    name, "ha.waiting", trigger.to_payload() | {"reason": f"cannot check host {old}: {exc.message}"}
                )
                return RestartOutcome.WAITING
            if is_on(state):
                await self._async_ha_event(
                    name, "ha.cancelled", trigger.to_payload() | {"reason": f"domain still {state} on {old}"}
                )
                return RestartOutcome.GONE
        # Whatever the fence said: a disk still locked by another process means a copy still runs.
        if await self._async_fence_lied(name, vm, old, trigger):
            return RestartOutcome.WAITING
        return None

    async def _async_fence_lied(self, name: str, vm: VM, old: str, trigger: Trigger) -> bool:
        """Probe the VM's disk before it starts away from ``old``: if another process still holds its lock, the
        fencing of ``old`` did not kill it. Record that on the VM, mark the host FenceFailed (an alert) and start
        nothing: a second QEMU on the same disk is what fencing exists to prevent."""
        path = vm.root_disk.get("path")
        if not path:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.LOCK_GRACE_S
        while True:
            try:
                holder = await storage.async_lock_holder(Path(path))
            except MolddError as exc:
                holder = None
                log.warning("disk_lock_probe_failed", vm=name, reason=exc.message)
            if holder is None:
                return False
            if loop.time() >= deadline:
                break
            # a QEMU killed by the fence releases its lock only once it has fully exited (slow on a busy host)
            await asyncio.sleep(0.5)
        reason = f"disk {path} is still locked by another process after host {old} was fenced: the fence lied"
        await self._async_ha_event(
            name, "ha.fence_lied", trigger.to_payload() | {"host": old, "disk": path, "probe": holder[-500:], "reason": reason}
        )
        await self._async_set_health(old, HostHealth.FENCE_FAILED, {"cause": reason, "vm": name})
        log.error("FENCE_LIED", host=old, vm=name, disk=path, action="not starting a second copy")
        return True

    # -- host watcher ----------------------------------------------------------------------------------
    async def _async_host_watcher(self) -> None:
        """Hand each host's events to a worker of its own: in order for one host, and a host whose handling
        waits (a fencing in progress) never holds up another."""
        while True:
            host, kind, position = await self.host_queue.get()
            inbox = self.host_inbox.setdefault(host, asyncio.Queue())
            inbox.put_nowait((kind, position))
            worker = self.host_workers.get(host)
            if worker is None or worker.done():
                self.host_workers[host] = asyncio.create_task(
                    self._async_host_worker(host, inbox), name=f"ha-host-worker-{host}"
                )

    async def _async_host_worker(self, host: str, inbox: asyncio.Queue[tuple[str, int]]) -> None:
        while True:
            kind, position = await inbox.get()
            await self._async_work("host-watcher", self._async_host_item(host, kind, position), host=host, kind=kind)

    def _host_task(self, host: str, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A host's failure handling or evacuation, run beside its worker; a crash counts as the host watcher's."""
        return asyncio.create_task(self._async_work("host-watcher", coro, host=host, work=name), name=f"ha-{name}-{host}")

    async def _async_host_item(self, host: str, kind: str, position: int) -> None:
        work = host_work(kind)
        if work is HostWork.BACK:
            await self._async_host_back(host, position)
            return
        if work is HostWork.EVACUATE:
            task = self.host_tasks.pop(host, None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.host_tasks[host] = self._host_task(host, self._async_evacuate(host), "evacuate")
            return
        task = self.host_tasks.get(host)
        if task is None or task.done():
            self.host_tasks[host] = self._host_task(host, self._async_host_failure(host, kind, position), "host")

    async def _async_set_health(self, host: str, to: HostHealth, cause: dict[str, Any]) -> bool:
        state = self.app.model.hosts.get(host)
        current = host_health(state.health if state else None)
        if current == to or not host_move_allowed(current, to):
            return False
        await self.app.async_append(
            f"host-{host}",
            [NewEvent("host.health", {"from": str(current), "to": str(to)} | cause, actor="ha")],
        )
        log.warning("host_health", host=host, was=str(current), now=str(to), cause=cause.get("cause"))
        return True

    async def _async_host_back(self, host: str, position: int) -> None:
        task = self.host_tasks.pop(host, None)
        if task is not None and not task.done() and self.host_phase.get(host) == "grace":
            task.cancel()  # it came back before we declared it dead: a blip, nothing to fence
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        elif task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)  # never interrupt a fencing in progress
        state = self.app.model.hosts.get(host)
        if state is not None and host_health(state.health) is HostHealth.FENCING:
            # no fencing runs (it ended above, or a daemon restart cut it short): its outcome is unknown
            await self._async_set_health(
                host,
                HostHealth.FENCE_FAILED,
                {"cause": "fencing was interrupted", "trigger_position": position},
            )
        state = self.app.model.hosts.get(host)
        if state is not None and host_health(state.health) is not HostHealth.UP:
            await self._async_set_health(
                host, HostHealth.UP, {"cause": "connection re-established", "trigger_position": position}
            )

    async def _async_host_failure(self, host: str, kind: str, position: int) -> None:
        """Up → Suspect → (still unreachable after the grace period) Down → Fencing → Fenced → evacuate."""
        app = self.app
        cfg = app.config.ha
        started = app.clock()
        if app.hosts.is_connected(host):
            return
        self.host_phase[host] = "grace"
        try:
            await self._async_set_health(
                host, HostHealth.SUSPECT, {"cause": f"link {kind}", "trigger_position": position}
            )
            await asyncio.sleep(cfg.host_down_after_s)
            if app.hosts.is_connected(host):
                return  # _async_host_back moves it to Up
        finally:
            # Past the grace period we are committed: Down, then fencing runs to its end (a host that answers
            # meanwhile waits for it), so no health state is left behind half-way (Down or Fencing forever).
            self.host_phase.pop(host, None)
        await self._async_set_health(
            host,
            HostHealth.DOWN,
            {"cause": f"unreachable for {cfg.host_down_after_s:g} s", "trigger_position": position},
        )
        vms = [v for v in app.model.vms_on(host) if v.state not in SETTLED_STATES]
        while True:
            state = app.model.hosts.get(host)
            if state is not None and needs_fencing_step(host_health(state.health)):
                await self._async_set_health(
                    host, HostHealth.FENCING, {"cause": "host down", "vms": [v.name for v in vms]}
                )
            result = await async_fence(app.config, host)
            if result.ok:
                await self._async_set_health(
                    host,
                    HostHealth.FENCED,
                    {"cause": "fence command succeeded", "fence": result.to_payload()},
                )
                break
            await self._async_set_health(
                host, HostHealth.FENCE_FAILED, {"cause": "fence command failed", "fence": result.to_payload()}
            )
            log.error(
                "FENCING_FAILED",
                host=host,
                output=result.output[-500:],
                vms=[v.name for v in vms],
                action="its VMs will NOT be started elsewhere until fencing succeeds or the host returns",
            )
            await asyncio.sleep(max(5.0, cfg.fence_timeout_s))
            if app.hosts.is_connected(host):
                return
        self.stats[f"fenced:{host}"] = app.clock() - started
        await self._async_evacuate(host)

    async def _async_evacuate(self, host: str) -> None:
        """The host is fenced: its VMs are dead. Record that, then restart the HA ones elsewhere, by priority."""
        app = self.app
        victims = [v for v in app.model.vms_on(host) if v.state in ON_HOST_STATES]
        order = evacuation_order([(v.name, v.ha_priority if v.ha_enabled else -1) for v in victims])
        await app.async_append(
            f"host-{host}", [NewEvent("ha.evacuation", {"host": host, "vms": order}, actor="ha")]
        )
        for name in order:
            job = app.jobs.get(app.vm_jobs.get(name, ""))
            if job is not None:
                # A command still works on it (a migration from this host, say): let it record its outcome
                # first (its calls to the fenced host fail), so that outcome cannot land on top of the restart.
                await asyncio.wait({job}, timeout=self.JOB_WAIT_S)
            async with app.claim(name) as claim:
                vm = claim.vm
                if vm.host != host or vm.state not in ON_HOST_STATES:
                    continue
                await app.async_append(
                    f"vm-{name}",
                    [
                        NewEvent(
                            "vm.reconciled",
                            {
                                "state": str(VMState.STOPPED),
                                "power_state": "off",
                                "host": host,
                                "domain_state": None,
                                "reason": f"host {host} was fenced",
                                "stop_cause": str(DownCause.HOST_FAILED),
                                "was": vm.state,
                            },
                            actor="ha",
                        )
                    ],
                )
        # The listener queues each HA VM from its vm.reconciled event; priority order is kept by the queue.
        # HA VMs of this host already down and waiting (e.g. after a fence that lied, now confirmed by an
        # operator) try again too.
        for vm in app.model.vms_on(host):
            if waits_for_a_host(vm):
                self.queue.put_nowait((vm.name, "host-fenced", vm.position))
