"""Lifecycle verbs: deploy, start, stop, reboot, destroy, recover, expunge (CloudStack/Mold API names)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from events import NO_STREAM, NewEvent, StoredEvent
from moldd.app.args import VM_ALIASES, Args
from moldd.app.bus import SYSTEM, Actor, CommandReply
from moldd.app.capacity import async_note_capacity
from moldd.app.placement import place_existing, place_new_vm, place_returning_vm
from moldd.app.secrets import protect_details
from moldd.app.service import App, Command, catalog_item, verb
from moldd.app.settings_check import async_check_settings
from moldd.app.specs import domain_spec, root_disk_path, vm_dir
from moldd.config import Config, IsoConfig, OfferingConfig, TemplateConfig
from moldd.domain.capacity import HostLoad
from moldd.domain.errors import Conflict, MolddError, NotFound, ValidationError, present
from moldd.domain.ha import RestartPolicy, blame_elsewhere, parse_policy
from moldd.domain.ids import is_uuid
from moldd.domain.names import (
    generate_vm_name,
    internal_name,
    validate_display_name,
    validate_group_name,
    validate_hostname,
)
from moldd.domain.settings import validate_details
from moldd.domain.states import Action, PowerState, VMState, check, check_stop
from moldd.libvirt import storage
from moldd.libvirt.xml import build_domain_xml
from moldd.projection.model import VM
from moldd.projection.readmodel import ReadModel

log = structlog.get_logger("moldd.lifecycle")
GIB = 1024**3


def err(exc: MolddError) -> dict[str, Any]:
    return exc.to_dict()


def hostname_taken(app: App, hostname: str, *, except_vm: str | None = None) -> bool:
    return any(
        v.hostname == hostname and v.name != except_vm and v.state != VMState.EXPUNGED
        for v in app.model.vms.values()
    )


# -- deploy ----------------------------------------------------------------------------------------------
DEPLOY_ARGS = {
    "offering", "template", "iso", "displayname", "hostname", "group", "ha", "hapolicy", "hapriority",
    "host", "rootdisksize", "startvm", "details", "description", "ostype", "cluster",
}  # fmt: skip
DEPLOY_ALIASES = {
    "serviceofferingid": "offering",
    "serviceoffering": "offering",
    "templateid": "template",
    "isoid": "iso",
    "name": "hostname",
    "hostid": "host",
    "haenable": "ha",
    "size": "rootdisksize",
}


@dataclass(frozen=True)
class DeployRequest:
    """A ``deployVirtualMachine`` request, parsed: catalog items found, every value validated."""

    offering: OfferingConfig
    template: TemplateConfig | None  # exactly one of template and iso
    iso: IsoConfig | None
    size_gb: int | None
    display_name: str | None
    hostname: str | None
    group: str | None
    ha: bool
    policy: RestartPolicy
    priority: int
    details: dict[str, Any]
    start: bool
    description: str
    os_type: str
    host: str | None  # a host asked for by name
    cluster: str | None  # CloudStack's zone


def parse_deploy(cfg: Config, raw: Mapping[str, Any]) -> DeployRequest:
    """Parse: the args of ``deployVirtualMachine``, catalog names (or stable ids) resolved; a refusal names the
    field."""
    a = Args(raw, DEPLOY_ARGS, DEPLOY_ALIASES)
    offering = catalog_item(cfg, "offering", a.text("offering"))
    template_name, iso_name = a.text("template", None), a.text("iso", None)
    if (template_name is None) == (iso_name is None):
        raise ValidationError(
            "give either template (deploy from a template) or iso (a blank VM that boots the ISO)",
            field="template",
        )
    template = catalog_item(cfg, "template", template_name) if template_name else None
    iso = catalog_item(cfg, "iso", iso_name) if iso_name else None
    size_gb = a.integer("rootdisksize", None, min=1, max=4096)
    if iso is not None and size_gb is None:
        raise ValidationError(
            "a blank VM needs rootdisksize (GiB) for its empty root disk", field="rootdisksize"
        )
    display = validate_display_name(a.raw("displayname"), field="displayname") if "displayname" in a else None
    hostname = validate_hostname(a.raw("hostname")) if "hostname" in a else None
    group = validate_group_name(a.raw("group")) if "group" in a else None
    ha = a.boolean("ha", False)
    policy = parse_policy(a.raw("hapolicy", cfg.ha.default_policy))
    priority = a.integer("hapriority", 0, min=0, max=100)
    details = {k: v for k, v in validate_details(a.mapping("details", {})).items() if v is not None}
    start = a.boolean("startvm", True)
    description = a.text("description", "", max_len=1024, multiline=True)
    os_type = a.text(
        "ostype", template.os_type if template else (iso.os_type if iso else "Other"), max_len=64
    )
    host = a.text("host", None)
    if host is not None and is_uuid(host):
        host = catalog_item(cfg, "host", host, "host").name
    return DeployRequest(
        offering, template, iso, size_gb, display, hostname, group, ha, policy, priority, details, start,
        description, os_type, host, a.text("cluster", None),
    )  # fmt: skip


def deploy_payload(
    cfg: Config, req: DeployRequest, *, name: str, vm_id: int, vm_uuid: str, host: HostLoad, details: dict[str, Any]
) -> dict[str, Any]:
    """Decide: the ``vm.deploy.requested`` payload of a VM called ``name`` placed on ``host`` (``details`` as
    they go into the log: secrets protected)."""
    display = req.display_name or name
    return {
        "name": name,
        "id": vm_id,
        "internal_name": internal_name(
            cfg.internal_name_pattern,
            account=cfg.account,
            vm_id=vm_id,
            instance=cfg.instance_suffix,
            display_name=display,
            append_display_name=cfg.append_display_name,
        ),
        "uuid": vm_uuid,
        "display_name": display,
        "hostname": req.hostname or name,
        "group": req.group,
        "description": req.description,
        "os_type": req.os_type,
        "host": host.name,
        "cluster": host.cluster,
        "ha_enabled": req.ha,
        "ha_policy": str(req.policy),
        "ha_priority": req.priority,
        "offering": req.offering.model_dump(),
        # the catalog also knows an item by its stable id: the log records the name
        "template": req.template.name if req.template else None,
        "iso": req.iso.name if req.iso else None,
        "root_disk": {"size_gb": req.size_gb},
        "details": details,
        "start": req.start,
    }


@verb("deployVirtualMachine")
async def deploy(app: App, cmd: Command) -> CommandReply:
    req = parse_deploy(app.config, cmd.args)
    if req.group is not None and req.group not in app.model.groups:
        raise NotFound(f"no VM group {req.group!r}: create it with createInstanceGroup", field="group")
    if req.details:
        settings_cluster = app.catalog("host", req.host).cluster if req.host else req.cluster
        template = req.template.name if req.template else None
        await async_check_settings(app, req.details, template=template, cluster=settings_cluster)
    async with app.placement_lock:
        host = place_new_vm(app.config, app.model, req.host, reserved=app.migrations, cluster=req.cluster)
        name = generate_vm_name(set(app.model.vms))
        if hostname_taken(app, req.hostname or name):
            raise Conflict(f"hostname {req.hostname or name!r} is already used by another VM", field="hostname")
        payload = deploy_payload(
            app.config, req, name=name, vm_id=app.model.next_vm_id, vm_uuid=str(uuid.uuid4()), host=host,
            details=protect_details(app.secrets, req.details),
        )  # fmt: skip
        ev = NewEvent(
            "vm.deploy.requested", payload, actor=str(cmd.actor), causation_id=cmd.id, correlation_id=cmd.id
        )
        res = await app.async_append(f"vm-{name}", [ev], expected_version=NO_STREAM, command_id=cmd.id)
    log.info("vm_deploy_requested", vm=name, host=host.name)
    try:
        await async_note_capacity(app, host.cluster, cmd, name)
    except MolddError as exc:  # a warning must never fail the deploy it follows
        log.warning("capacity_warning_failed", reason=exc.message)
    app.spawn_job(cmd.id, name, async_run_deploy(app, name, cmd, req.start))
    return app.job_reply(cmd.id, app.model.vms[name], res.last_position)


async def async_run_deploy(app: App, name: str, cmd: Command, start: bool) -> None:
    cfg = app.config
    vm = app.model.vms[name]
    disk = root_disk_path(cfg, name)
    try:
        disk.parent.mkdir(parents=True, exist_ok=True)
        size_gb = vm.root_disk.get("size_gb")
        if vm.template is not None:
            template = present(cfg.template(vm.template), f"template {vm.template}")
            await storage.async_create_overlay(template.image, disk, size_gb * GIB if size_gb else None)
        else:
            await storage.async_create_blank(disk, int(present(size_gb, "root disk size")) * GIB)
        info = await storage.async_info(disk)
        root = {"path": str(disk), "size_gb": round(info.virtual_size / GIB, 3)}
        spec = domain_spec(cfg, dataclasses.replace(vm, root_disk=root))
        conn = app.hosts.conn(vm.host)
        await conn.async_define(build_domain_xml(spec))
    except MolddError as exc:
        shutil.rmtree(vm_dir(cfg, name), ignore_errors=True)
        await app.async_record(name, "vm.deploy.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd)
        return
    done = {} if start else {"job_status": "succeeded", "result": {"vm": name}}
    await app.async_record(name, "vm.created", {"root_disk": root, "host": vm.host, **done}, cmd=cmd)
    if start:
        vm = app.model.vms[name]
        host = present(vm.host, f"host of {name}")
        await app.async_record(name, "vm.start.requested", {"host": host, "cluster": vm.cluster}, cmd=cmd)
        await async_start_on(app, name, host, cmd=cmd)


# -- start -----------------------------------------------------------------------------------------------
async def async_start_on(
    app: App, name: str, host: str, *, cmd: Command | None = None, job: str | None = None, actor: Actor | None = None,
    ok_type: str = "vm.started", fail_type: str = "vm.start.failed", extra: dict[str, Any] | None = None,
    blame: dict[str, Any] | None = None,
) -> bool:  # fmt: skip
    """Define (so offering and settings changes apply) and start the domain on ``host``; record the outcome.
    On failure ``blame`` (if given) gets ``counts`` (False: not the VM's own failure) and the reason."""
    vm = app.model.vms[name]
    try:
        conn = app.hosts.conn(host)
        await conn.async_define(build_domain_xml(domain_spec(app.config, vm)))
        if await conn.async_domain_state(vm.internal_name) not in ("running", "paused", "blocked"):
            await conn.async_create(vm.internal_name)
    except MolddError as exc:
        elsewhere = blame_elsewhere(exc.message)
        found = {"counts": elsewhere is None} | ({"not_the_vms_fault": elsewhere} if elsewhere else {})
        if blame is not None:
            blame.update(found)
        await app.async_record(
            name, fail_type,
            {"host": host, "error": err(exc), "job_status": "failed", **found, **(extra or {})},
            cmd=cmd, job=job, actor=actor,
        )  # fmt: skip
        return False
    await app.async_record(
        name,
        ok_type,
        {"host": host, "job_status": "succeeded", **(extra or {})},
        cmd=cmd,
        job=job,
        actor=actor,
    )
    for other in app.config.hosts:  # a definition left on a previous host would confuse a later resync
        if other.name != host and app.hosts.is_connected(other.name):
            app.spawn(app.hosts.async_forget_domain(other.name, vm.internal_name), name=f"forget-{name}")
    return True


@verb("startVirtualMachine")
async def start_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "host"}, VM_ALIASES | {"hostid": "host"})
    vm = app.get_vm({"id": a.raw("id")})
    target = a.text("host", None)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(vm.state, Action.START)
        if target is not None:
            target = app.catalog("host", target).name  # a name or its stable id
        host = place_existing(
            app.config,
            app.model,
            vm.name,
            current=target or vm.host,
            cluster=vm.cluster,
            reserved=app.migrations,
        )
        if target is not None and host.name != target:
            raise Conflict(f"host {target!r} is down or full", field="host")
        res = await app.async_record(
            vm, "vm.start.requested", {"host": host.name, "cluster": host.cluster}, cmd=cmd, first=True
        )
    app.spawn_job(cmd.id, vm.name, _async_start_job(app, vm.name, host.name, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_start_job(app: App, name: str, host: str, cmd: Command) -> None:
    await async_start_on(app, name, host, cmd=cmd)


# -- stop ------------------------------------------------------------------------------------------------
@verb("stopVirtualMachine")
async def stop_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "forced"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    forced = a.boolean("forced", False)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check_stop(VMState(vm.state), ha_restart_pending=vm.ha_status == "pending")
        res = await app.async_record(vm, "vm.stop.requested", {"forced": forced, "host": vm.host}, cmd=cmd, first=True)
    app.spawn_job(cmd.id, vm.name, async_stop_job(app, vm.name, forced, cmd=cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def async_power_off(app: App, vm: VM, forced: bool) -> dict[str, Any]:
    """ACPI shutdown, then forced off after the stop timeout (or at once when ``forced``). Returns how."""
    conn = app.hosts.conn(present(vm.host, f"host of {vm.name}"))
    state = await conn.async_domain_state(vm.internal_name)
    if state in (None, "shutoff", "crashed"):
        return {"how": "already-off"}
    if forced:
        await conn.async_destroy(vm.internal_name)
        return {"how": "forced"}
    await conn.async_shutdown(vm.internal_name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app.config.stop_timeout_s
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        if await conn.async_domain_state(vm.internal_name) in (None, "shutoff", "crashed"):
            return {"how": "graceful"}
    await conn.async_destroy(vm.internal_name)
    return {"how": "forced-after-timeout", "timeout_s": app.config.stop_timeout_s}


async def async_stop_job(
    app: App, name: str, forced: bool, *, cmd: Command | None = None, job: str | None = None
) -> bool:
    vm = app.model.vms[name]
    try:
        if vm.prior_state == VMState.STOPPED and (vm.host is None or not app.hosts.is_connected(vm.host)):
            how = {
                "how": "already-off"
            }  # stopped while HA waited to restart it: nothing runs, nothing to ask
        else:
            how = await async_power_off(app, vm, forced)
    except MolddError as exc:
        await app.async_record(
            name, "vm.stop.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd, job=job
        )
        return False
    await app.async_record(name, "vm.stopped", {**how, "job_status": "succeeded"}, cmd=cmd, job=job)
    return True


# -- reboot ----------------------------------------------------------------------------------------------
@verb("rebootVirtualMachine")
async def reboot_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "forced"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    forced = a.boolean("forced", False)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(VMState(vm.state), Action.REBOOT)
        res = await app.async_record(vm, "vm.reboot.requested", {"forced": forced, "host": vm.host}, cmd=cmd, first=True)
    app.spawn_job(cmd.id, vm.name, _async_reboot_job(app, vm.name, forced, cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


# what libvirt reports when a guest honours an ACPI reboot: its reset (libvirt's REBOOT event, from a fake reboot)
REBOOT_SIGNS = frozenset({"REBOOTED", "SHUTDOWN", "STARTED", "STOPPED"})


@contextlib.contextmanager
def domain_event_waiter(
    app: App, name: str, kinds: frozenset[str]
) -> Iterator[asyncio.Future[dict[str, Any]]]:
    """A future set by the first libvirt lifecycle event of ``kinds`` on the VM's stream folded from now on."""
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    stream = f"vm-{name}"

    def listener(ev: StoredEvent, model: ReadModel) -> None:
        if (
            not fut.done()
            and ev.stream_id == stream
            and ev.event_type == "libvirt.domain_event"
            and ev.payload.get("event") in kinds
        ):
            fut.set_result(dict(ev.payload) | {"position": ev.position})

    unsubscribe = app.projector.add_listener(listener)
    try:
        yield fut
    finally:
        unsubscribe()


async def _async_reboot_job(app: App, name: str, forced: bool, cmd: Command) -> None:
    """Forced: a reset (``virDomainReset``), done when libvirt says so. Graceful: the ACPI request, done when the
    guest reacts (its shutdown / reset is reported) within the stop timeout; a guest that ignores it is reported
    as such, not as rebooted."""
    vm = app.model.vms[name]
    timeout = app.config.stop_timeout_s
    try:
        conn = app.hosts.conn(present(vm.host, f"host of {name}"))
        if forced:
            await conn.async_reset(vm.internal_name)
            how: dict[str, Any] = {"how": "reset"}
        else:
            with domain_event_waiter(app, name, REBOOT_SIGNS) as sign:
                await conn.async_reboot(vm.internal_name)
                try:
                    seen = await asyncio.wait_for(sign, timeout)
                except TimeoutError:
                    raise MolddError(
                        f"the guest did not react to the ACPI reboot request within {timeout:g} s (no ACPI "
                        "support, or it ignores the power button); reboot with forced=true to reset it",
                        code="guest_ignored_reboot",
                    ) from None
            how = {"how": "acpi", "seen": {"event": seen.get("event"), "detail": seen.get("detail"),
                                           "position": seen["position"]}}  # fmt: skip
    except MolddError as exc:
        await app.async_record(name, "vm.reboot.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd)
        return
    await app.async_record(
        name, "vm.rebooted", {"forced": forced, **how, "job_status": "succeeded"}, cmd=cmd
    )


# -- destroy / recover / expunge -------------------------------------------------------------------------
@verb("destroyVirtualMachine")
async def destroy_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id", "expunge", "forced"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    expunge = a.boolean("expunge", False)
    forced = a.boolean("forced", False)
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(VMState(vm.state), Action.DESTROY)
        # CloudStack: Error + DestroyRequested -> Expunging (an Error VM is not kept for recovery)
        expunge = expunge or vm.state == VMState.ERROR
        res = await app.async_record(
            vm, "vm.destroy.requested", {"expunge": expunge, "forced": forced, "host": vm.host}, cmd=cmd, first=True
        )
    app.spawn_job(cmd.id, vm.name, _async_destroy_job(app, vm.name, expunge, cmd, forced=forced))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_destroy_job(app: App, name: str, expunge: bool, cmd: Command, *, forced: bool = False) -> None:
    """As CloudStack: a running VM is stopped first (ACPI, then forced off after the stop timeout; at once when
    ``forced``) and recorded Stopped, so there is no Running -> Destroyed edge; then its definition goes."""
    vm = app.model.vms[name]
    try:
        if vm.host is not None and (vm.power_state != PowerState.OFF or app.hosts.is_connected(vm.host)):
            conn = app.hosts.conn(vm.host)
            if await conn.async_domain_state(vm.internal_name) not in (None, "shutoff", "crashed"):
                how = await async_power_off(app, vm, forced)
                await app.async_record(name, "vm.stopped", {**how, "for": "destroy"}, cmd=cmd)
            await conn.async_undefine(vm.internal_name)
    except MolddError as exc:
        await app.async_record(
            name, "vm.destroy.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd
        )
        return
    at = None if expunge else (datetime.now(UTC) + timedelta(seconds=app.config.expunge_delay_s)).isoformat()
    done = {} if expunge else {"job_status": "succeeded"}
    await app.async_record(name, "vm.destroyed", {"expunge_at": at, **done}, cmd=cmd)
    if expunge:
        await app.async_record(name, "vm.expunge.requested", {}, cmd=cmd)
        await async_expunge_now(app, name, cmd=cmd)


async def async_expunge_now(
    app: App, name: str, *, cmd: Command | None = None, job: str | None = None
) -> None:
    vm = app.model.vms[name]
    try:
        for host in app.config.hosts:  # the definition may linger on any host it ever ran on
            if app.hosts.is_connected(host.name):
                await app.hosts.conn(host.name).async_undefine(vm.internal_name)
        await asyncio.to_thread(shutil.rmtree, vm_dir(app.config, name), True)
    except MolddError as exc:
        await app.async_record(
            name, "vm.expunge.failed", {"error": err(exc), "job_status": "failed"}, cmd=cmd, job=job
        )
        return
    await app.async_record(name, "vm.expunged", {"job_status": "succeeded"}, cmd=cmd, job=job)


@verb("recoverVirtualMachine")
async def recover_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(VMState(vm.state), Action.RECOVER)
        # A recovered VM counts again (a Destroyed one does not): it needs room like a deploy does. The VM's lock
        # first, then the placement lock, as every other verb takes them.
        async with app.placement_lock:
            host = place_returning_vm(
                app.config, app.model, vm.name, current=vm.host, cluster=vm.cluster, reserved=app.migrations
            )
            res = await app.async_record(
                vm, "vm.recovered", {"host": host.name, "cluster": host.cluster}, cmd=cmd, first=True
            )
    return CommandReply(result={"vm": app.model.vms[vm.name].to_dict()}, position=res.last_position)


@verb("expungeVirtualMachine")
async def expunge_vm(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"id"}, VM_ALIASES)
    vm = app.get_vm({"id": a.raw("id")})
    async with app.claim(vm.name) as claim:
        vm = claim.vm
        check(VMState(vm.state), Action.EXPUNGE)
        res = await app.async_record(vm, "vm.expunge.requested", {}, cmd=cmd, first=True)
    app.spawn_job(cmd.id, vm.name, async_expunge_now(app, vm.name, cmd=cmd))
    return app.job_reply(cmd.id, vm, res.last_position)


async def _async_retry_expunge(app: App, name: str) -> None:
    async with app.claim(name) as claim:
        current = claim.vm
        if current.state != VMState.EXPUNGING or current.job:
            return
        job = f"expunge-{name}-{current.version}"
        await app.async_record(current, "vm.expunge.requested", {"reason": "retry of a failed expunge"}, job=job,
                               actor=SYSTEM)  # fmt: skip
    app.spawn_job(job, name, async_expunge_now(app, name, job=job))


async def async_sweep_expunged(app: App, interval_s: float = 10.0) -> None:
    """Expunge Destroyed VMs whose delay has passed (CloudStack's expunge sweeper). Each expunge is re-checked
    under the VM's lock and runs as a job of its own, so resync and other commands see the VM as busy."""
    while True:
        try:
            now = datetime.now(UTC).isoformat()
            for vm in list(app.model.vms.values()):
                if vm.state == VMState.EXPUNGING and not vm.job and not app.busy(vm.name):
                    await _async_retry_expunge(app, vm.name)  # a failed expunge stays Expunging: retried here
                    continue
                if vm.state != VMState.DESTROYED or not vm.expunge_at or vm.expunge_at > now or app.busy(vm.name):
                    continue
                async with app.claim(vm.name) as claim:
                    current = claim.vm
                    if current.state != VMState.DESTROYED or not current.expunge_at or current.expunge_at > now:
                        continue  # recovered (or expunged) meanwhile
                    job = f"expunge-{vm.name}-{current.version}"
                    await app.async_record(
                        current,
                        "vm.expunge.requested",
                        {"reason": "expunge delay passed"},
                        job=job,
                        actor=SYSTEM,
                    )
                app.spawn_job(job, vm.name, async_expunge_now(app, vm.name, job=job))
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad sweep must not end the sweeper
            log.exception("expunge_sweep_failed")
        await asyncio.sleep(interval_s)
