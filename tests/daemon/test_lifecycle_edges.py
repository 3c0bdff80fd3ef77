"""Lifecycle and HA edges found by driving the daemon against independent libvirt hosts (issue 12), each on real
libvirtd + QEMU: every event folded, crashes during migration seen, states after a restart from a snapshot,
paused guests, failure reasons on the VM."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import libvirt
import pytest

from moldd.domain.errors import MolddError, Unavailable
from moldd.domain.states import Action, VMState, is_allowed
from moldlab.testing.harness import Client, running_daemon
from tests.daemon.test_ha import deploy_ha, qemu_pid, running_copies, wait_event

pytestmark = pytest.mark.libvirt


def lv_domain(lab: Any, host: str, domain: str) -> tuple[libvirt.virConnect, libvirt.virDomain]:
    conn = libvirt.open(next(h for h in lab.hosts if h.name == host).uri)
    return conn, conn.lookupByName(domain)


# -- 1: an event the fold had no handler for bricked the VM (409 "kept changing" for ever) ----------------------
async def test_vm_left_down_by_ha_policy_still_takes_commands_also_after_a_restart(
    make_config: Any, clean_lab: Any
) -> None:
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, hapolicy="on-failure", details={"kernel_args": "halt_after=2"})
        await wait_event(client, vm["name"], "ha.not_restarted", timeout=240)  # a TCG boot on a busy machine
        view = await client.vm(vm["name"])
        events = await client.events(vm["name"])
        assert view["version"] == events[-1]["stream_version"]
        assert view["state"] == "Stopped" and view["ha_status"] is None
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        start = await client.job("startVirtualMachine", id=vm["name"])
        assert start["status"] == "succeeded", start
        assert (await client.job("stopVirtualMachine", id=vm["name"], forced=True))["status"] == "succeeded"
        destroy = await client.job("destroyVirtualMachine", id=vm["name"], expunge=True)
        assert destroy["status"] == "succeeded", destroy
        assert (await client.vm(vm["name"]))["state"] == "Expunged"


# -- 2: the source QEMU dies during a live migration -----------------------------------------------------------
async def test_source_crash_during_live_migration_stops_the_vm_and_ha_restarts_it(
    client: Client, clean_lab: Any
) -> None:
    vm = await deploy_ha(client)
    src, dst = vm["host"], next(h.name for h in clean_lab.hosts if h.name != vm["host"])
    conn, dom = lv_domain(clean_lab, src, vm["internal_name"])
    try:
        dom.migrateSetMaxSpeed(1)  # 1 MiB/s: the migration lasts long enough to crash it half-way
    finally:
        conn.close()
    pos = (await client.events(vm["name"]))[-1]["position"]
    reply = await client.call("migrateVirtualMachine", id=vm["name"], host=dst)
    await wait_event(client, vm["name"], "vm.migrate.progress", after=pos)
    os.kill(qemu_pid(clean_lab, src, vm["internal_name"]), signal.SIGKILL)
    job = await client.wait_job(reply["result"]["job"]["id"])
    assert job["status"] == "failed", job
    restarted = await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos, timeout=60)
    assert restarted["payload"]["cause"] == "crashed"
    after = await client.wait_vm(vm["name"], state="Running", power_state="on")
    assert running_copies(clean_lab, vm["internal_name"]) == [after["host"]]
    kinds = [e["event_type"] for e in await client.events(vm["name"]) if e["position"] > pos]
    assert kinds.index("ha.restart.scheduled") < kinds.index("ha.restart.succeeded")


# -- 3 and 9: every verb against every state, on a daemon restarted from its snapshot ---------------------------
VERBS: list[tuple[str, Action, dict[str, Any]]] = [
    ("startVirtualMachine", Action.START, {}),
    ("stopVirtualMachine", Action.STOP, {}),
    ("rebootVirtualMachine", Action.REBOOT, {}),
    ("destroyVirtualMachine", Action.DESTROY, {}),
    ("recoverVirtualMachine", Action.RECOVER, {}),
    ("expungeVirtualMachine", Action.EXPUNGE, {}),
    ("updateVirtualMachine", Action.EDIT, {"displayname": "renamed"}),
    ("updateVirtualMachineSettings", Action.SETTINGS, {"details": {"kernel_args": "quiet"}}),
    ("changeServiceForVirtualMachine", Action.CHANGE_OFFERING, {"offering": "medium"}),
    ("scaleVirtualMachine", Action.SCALE, {"offering": "medium"}),
    ("resizeVolume", Action.RESIZE, {"size": 3}),
    ("migrateVirtualMachine", Action.MIGRATE, {"host": "host1"}),  # (a Stopped / Created VM is moved offline)
    ("restoreVirtualMachine", Action.RESTORE, {}),
    ("createVMSnapshot", Action.SNAPSHOT, {"name": "s"}),
    ("attachIso", Action.ATTACH_ISO, {"iso": "installer"}),
    ("detachIso", Action.DETACH_ISO, {}),
    ("getVirtualMachineConsole", Action.CONSOLE, {}),
]


async def _sweep(client: Client, vms: dict[str, str]) -> dict[tuple[str, str], tuple[int, str]]:
    """Every verb the state table refuses, on every VM: status and error code (a refusal writes nothing)."""
    out = {}
    for state, name in vms.items():
        for verb, action, args in VERBS:
            if is_allowed(VMState(state), action) or (action is Action.MIGRATE and state in ("Created", "Stopped")):
                continue
            status, reply = await client.raw(verb, {"id": name, **args})
            out[(state, verb)] = (status, (reply.get("error") or {}).get("code", "ok"))
    return out


async def test_every_verb_against_every_state_after_a_restart_from_a_snapshot(
    make_config: Any, clean_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moldd.libvirt import storage

    config = make_config(max_vms=8)
    hang = asyncio.Event()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        created = (await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False))["vm"]
        running = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
        stopped = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
        await client.job("stopVirtualMachine", id=stopped, forced=True)
        destroyed = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
        await client.job("stopVirtualMachine", id=destroyed, forced=True)
        await client.job("destroyVirtualMachine", id=destroyed)

        async def refuse(*a: Any, **kw: Any) -> Any:
            raise Unavailable("the storage refused (injected)", field="template")

        monkeypatch.setattr(storage, "async_create_overlay", refuse)
        failed = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]

        async def never(*a: Any, **kw: Any) -> Any:
            await hang.wait()
            raise MolddError("unreachable")

        monkeypatch.setattr(storage, "async_create_overlay", never)
        interrupted = (await client.call("deployVirtualMachine", template="tiny", offering="small"))["result"]["vm"]
        monkeypatch.undo()
        vms = {"Created": created, "Running": running, "Stopped": stopped, "Destroyed": destroyed, "Error": failed}
        assert {s: (await client.vm(n))["state"] for s, n in vms.items()} == {s: s for s in vms}
        assert (await client.vm(failed))["error"] == "the storage refused (injected)"
        fresh = await _sweep(client, vms)
    assert {k: v for k, v in fresh.items() if v[0] != 409} == {}
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        restarted = await _sweep(client, vms)
        assert restarted == fresh  # it used to be 500 (AttributeError in states.check) for every refusal
        assert d.projector.model.vms[running].state is VMState.RUNNING  # restored from the snapshot, an enum
        # 9: a deploy cut short by the daemon's stop is Error, and the VM says why (not only its job)
        lost = await client.wait_vm(interrupted["name"], state="Error")
        assert lost["error"] and "interrupted" in lost["error"], lost
        assert (await client.job("startVirtualMachine", id=stopped))["status"] == "succeeded"
        assert (await client.job("stopVirtualMachine", id=running, forced=True))["status"] == "succeeded"


# -- 10: a guest paused behind moldd's back ----------------------------------------------------------------------
async def test_suspend_and_resume_behind_our_back_show_as_power_state(client: Client, clean_lab: Any) -> None:
    name = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    vm = await client.vm(name)
    # 15: a dynamic offering's guest may hold its maximum memory: the host view says what is committed
    host = next(h for h in (await client.call("listHosts"))["result"]["host"] if h["name"] == vm["host"])
    assert (host["memory_offered_mib"], host["memory_committed_mib"]) == (128, 256), host
    conn, dom = lv_domain(clean_lab, vm["host"], vm["internal_name"])
    try:
        dom.suspend()
        paused = await client.wait_vm(name, power_state="paused")
        assert paused["state"] == "Running"
        dom.resume()
        await client.wait_vm(name, power_state="on")
    finally:
        conn.close()


# -- 4 and 13: recover brings a VM back into the count ----------------------------------------------------------
async def test_recover_checks_capacity_like_deploy(make_config: Any, clean_lab: Any) -> None:
    async with running_daemon(make_config(max_vms=2)) as d, Client(d.config.socket) as client:
        a = (await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False))["vm"]
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        await client.job("destroyVirtualMachine", id=a)
        c = (await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False))["vm"]
        status, reply = await client.raw("recoverVirtualMachine", {"id": a})
        assert status == 409 and reply["error"]["code"] == "insufficient_capacity", reply
        assert reply["error"]["field"] == "id"
        assert (await client.vm(a))["state"] == "Destroyed"
        cap = (await client.call("listClusters"))["result"]["cluster"][0]
        assert cap["used"] == 2 and cap["headroom"] == 0, cap
        # 13: a deploy that names no host is not refused "because of" field hostid
        status, reply = await client.raw("deployVirtualMachine", {"template": "tiny", "offering": "small"})
        assert status == 409 and reply["error"]["field"] is None, reply
        await client.job("destroyVirtualMachine", id=c)
        back = await client.call("recoverVirtualMachine", id=a)
        assert back["result"]["vm"]["state"] == "Stopped"
        assert (await client.job("startVirtualMachine", id=a))["status"] == "succeeded"


# -- 5: forced reboot is a reset; an ignored ACPI reboot is not a success -------------------------------------------
async def _console(client: Client, name: str) -> str:
    from pathlib import Path

    vm = await client.vm(name)
    log = Path(vm["root_disk"]["path"]).parent / "console.log"
    return log.read_text(errors="replace") if log.exists() else ""


async def _wait_ready(client: Client, name: str, count: int, timeout: float = 240.0) -> None:
    """TCG boots take seconds on an idle machine and minutes on a loaded one: the timeout is generous."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await _console(client, name)).count("MOLDD-GUEST-READY") < count:
        if loop.time() > deadline:
            raise TimeoutError(f"{name}: fewer than {count} ready lines on the console")
        await asyncio.sleep(0.2)


async def test_forced_reboot_resets_a_guest_that_ignores_acpi(client: Client, clean_lab: Any) -> None:
    deaf = (await client.job("deployVirtualMachine", template="tiny", offering="small",
                             details={"kernel_args": "acpi=off"}))["vm"]  # fmt: skip
    await _wait_ready(client, deaf, 1)
    graceful = await client.job("rebootVirtualMachine", id=deaf)
    assert graceful["status"] == "failed" and graceful["error"]["code"] == "guest_ignored_reboot", graceful
    assert (await _console(client, deaf)).count("MOLDD-GUEST-READY") == 1  # it did not reboot
    forced = await client.job("rebootVirtualMachine", id=deaf, forced=True)
    assert forced["status"] == "succeeded", forced
    await _wait_ready(client, deaf, 2)  # the guest booted again: a real reset
    rebooted = (await client.events(deaf, "vm.rebooted"))[-1]["payload"]
    assert rebooted["how"] == "reset"
    assert (await client.vm(deaf))["state"] == "Running"


async def test_graceful_reboot_of_a_guest_that_honours_acpi_succeeds(client: Client, clean_lab: Any) -> None:
    name = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    await _wait_ready(client, name, 1)
    job = await client.job("rebootVirtualMachine", id=name)
    assert job["status"] == "succeeded", job
    await _wait_ready(client, name, 2)
    rebooted = (await client.events(name, "vm.rebooted"))[-1]["payload"]
    assert rebooted["how"] == "acpi"
    await client.wait_vm(name, state="Running", power_state="on")


# -- 6: destroying a Running VM stops it first --------------------------------------------------------------------
def _states(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_type"] for e in events if e["event_type"] in ("vm.stopped", "vm.destroyed", "vm.expunged")]


async def test_destroy_of_a_running_vm_stops_it_gracefully_first(client: Client, clean_lab: Any) -> None:
    polite = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    deaf = (await client.job("deployVirtualMachine", template="tiny", offering="small",
                             details={"kernel_args": "acpi=off"}))["vm"]  # fmt: skip
    hard = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    for name in (polite, deaf, hard):
        await _wait_ready(client, name, 1)
    jobs = await asyncio.gather(
        client.job("destroyVirtualMachine", id=polite),
        client.job("destroyVirtualMachine", id=deaf),
        client.job("destroyVirtualMachine", id=hard, forced=True, expunge=True),
    )
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    for name, how in ((polite, "graceful"), (deaf, "forced-after-timeout"), (hard, "forced")):
        events = await client.events(name)
        stopped = [e for e in events if e["event_type"] == "vm.stopped"]
        assert stopped and stopped[-1]["payload"]["how"] == how, (name, stopped)
        assert _states(events)[:2] == ["vm.stopped", "vm.destroyed"], name
    assert "MOLDD-GUEST-ACPI-POWEROFF" in await _console(client, polite)
    assert (await client.vm(hard))["state"] == "Expunged"


# -- 7: only the VM's own failures use up its restart budget -------------------------------------------------------
async def test_restart_failing_on_a_locked_disk_does_not_use_up_the_budget(make_config: Any, clean_lab: Any) -> None:
    import subprocess

    config = make_config(ha={"max_restarts": 2, "backoff_base_s": 3.0, "backoff_cap_s": 4.0, "window_s": 300})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client)
        pos = (await client.events(vm["name"]))[-1]["position"]
        os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
        first = await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos)  # restart 1 of 2
        os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
        await wait_event(client, vm["name"], "ha.restart.scheduled", after=first["position"])  # 3 s back-off
        # meanwhile another process takes the disk's write lock (what a live copy, or the lab, would do)
        holder = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "qcow2", vm["root_disk"]["path"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            failed = await wait_event(client, vm["name"], "ha.restart.failed", after=first["position"], timeout=30)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            await asyncio.wait_for(holder.wait(), 10)
        assert failed["payload"]["counts"] is False and "locked" in failed["payload"]["not_the_vms_fault"]
        done = await wait_event(client, vm["name"], "ha.restart.succeeded", after=failed["position"], timeout=30)
        assert done["payload"]["attempt"] == 2
        kinds = [e["event_type"] for e in await client.events(vm["name"])]
        assert "ha.gave_up" not in kinds
        assert (await client.wait_vm(vm["name"], state="Running"))["error"] is None


# -- 11: CloudStack's edges -----------------------------------------------------------------------------------------
async def test_cloudstack_edges_stop_stopped_destroy_error_and_expunge_retry(
    make_config: Any, clean_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moldd.libvirt import storage
    from moldd.libvirt.host import HostConnection

    config = make_config(daemon={"expunge_sweep_s": 0.2})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        # stopping a Stopped VM is a no-op success
        name = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
        assert (await client.job("stopVirtualMachine", id=name, forced=True))["status"] == "succeeded"
        again = await client.job("stopVirtualMachine", id=name)
        assert again["status"] == "succeeded", again
        assert (await client.events(name, "vm.stopped"))[-1]["payload"]["how"] == "already-off"
        assert (await client.vm(name))["state"] == "Stopped"

        # destroying an Error VM expunges it (CloudStack: Error + DestroyRequested -> Expunging)
        async def refuse(*a: Any, **kw: Any) -> Any:
            raise Unavailable("the storage refused (injected)", field="template")

        monkeypatch.setattr(storage, "async_create_overlay", refuse)
        broken = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
        monkeypatch.undo()
        assert (await client.vm(broken))["state"] == "Error"
        assert (await client.job("destroyVirtualMachine", id=broken))["status"] == "succeeded"
        assert (await client.vm(broken))["state"] == "Expunged"

        # a failed expunge stays Expunging, and the sweeper tries it again
        real_undefine = HostConnection.async_undefine
        fails = {"n": 0}

        async def undefine_once_broken(self: Any, domain: str) -> bool:
            if fails["n"] == 0:
                fails["n"] += 1
                raise Unavailable("the host refused the undefine (injected)", field="host")
            return await real_undefine(self, domain)

        assert (await client.job("destroyVirtualMachine", id=name))["status"] == "succeeded"
        monkeypatch.setattr(HostConnection, "async_undefine", undefine_once_broken)
        failed = await client.job("expungeVirtualMachine", id=name)
        assert failed["status"] == "failed" and failed["state"] == "Expunging", failed  # not back to Destroyed
        await client.wait_vm(name, state="Expunged")
        kinds = [e["event_type"] for e in await client.events(name)]
        after = kinds[kinds.index("vm.expunge.failed"):]
        assert after.count("vm.expunge.requested") == 1 and after[-1] == "vm.expunged", after


# -- 12: moldctl events shows the newest entries and says what it left out; vm deploy --details ----------------------
async def test_moldctl_events_newest_first_with_a_more_line_and_deploy_details(daemon: Any, client: Client) -> None:
    from tests.daemon.test_daemon_spine import moldctl

    sock = daemon.config.socket
    code, out, err = await moldctl(sock, "vm", "deploy", "--template", "tiny", "--offering", "small", "--no-start",
                                   "--details", "kernel_args=quiet loglevel=1", "--details", "cpu_model=qemu64")  # fmt: skip
    assert code == 0, err
    name = (await client.call("listVirtualMachines", listall=True))["result"]["virtualmachine"][0]["name"]
    assert (await client.vm(name))["details"] == {"kernel_args": "quiet loglevel=1", "cpu_model": "qemu64"}
    code, out, err = await moldctl(sock, "vm", "deploy", "--template", "tiny", "--offering", "small",
                                   "--details", "no-equals-sign")  # fmt: skip
    assert code != 0 and "--details takes key=value" in err
    events = await client.events_of_stream(f"vm-{name}")
    code, out, err = await moldctl(sock, "events", "--limit", "2")
    assert code == 0, err
    head = (await client.call("listEvents", newest=True, limit=1))["result"]["event"][0]["position"]
    assert str(head) in out and "older entries not shown (--from 1" in out
    assert "CHANGED" in out.splitlines()[0]
    code, out, err = await moldctl(sock, "events", "--vm", name, "--limit", "1")
    assert code == 0 and f"{len(events) - 1} older entries not shown" in out, out
    code, out, err = await moldctl(sock, "events", "--vm", name, "--from", "1", "--limit", "1")
    assert code == 0 and "newer entries not shown" in out, out


# -- 14: reinstall stops gracefully; a display-name edit reaches the running domain; console access is recorded ----
async def test_reinstall_stops_gracefully_edit_reaches_the_domain_and_console_is_audited(
    client: Client, clean_lab: Any
) -> None:
    import xml.etree.ElementTree as ET

    name = (await client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    vm = await client.vm(name)
    await _wait_ready(client, name, 1)
    await client.call("updateVirtualMachine", id=name, displayname="renamed live")
    conn, dom = lv_domain(clean_lab, vm["host"], vm["internal_name"])
    try:
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            assert ET.fromstring(dom.XMLDesc(flags)).findtext("description") == "renamed live", flags
    finally:
        conn.close()
    await client.call("getVirtualMachineConsole", id=name)
    opened = (await client.events(name, "vm.console.opened"))[-1]
    assert f"uid={os.getuid()}" in opened["actor"] and opened["payload"]["host"] == vm["host"]
    job = await client.job("restoreVirtualMachine", id=name)
    assert job["status"] == "succeeded", job
    stopped = [e for e in await client.events(name, "vm.stopped") if e["payload"].get("for") == "restore"]
    assert stopped and stopped[-1]["payload"]["how"] == "graceful"
    assert "MOLDD-GUEST-ACPI-POWEROFF" in await _console(client, name)
    events = await client.call("listEvents", vm=name)
    kinds = {(e["event_type"], e["cloudstack_type"], e["cloudstack_state"]) for e in events["result"]["event"]}
    assert ("vm.start.requested", "VM.START", "Scheduled") in kinds and ("vm.started", "VM.START", "Completed") in kinds
