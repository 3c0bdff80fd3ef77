"""Core lifecycle verbs against real libvirtd hosts and real QEMU guests, through the real socket API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moldlab.testing.harness import Client, CommandFailed
from moldlab.testing.load import scaled
from tests.daemon.conftest import domain_state

pytestmark = pytest.mark.libvirt


def host_index(vm: dict[str, Any]) -> int:
    return int(vm["host"].removeprefix("host"))


async def test_deploy_from_template_runs_a_real_guest(client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", displayname="Web 1")
    assert job["status"] == "succeeded", job
    vm = await client.vm(job["vm"])
    assert vm["state"] == "Running" and vm["power_state"] == "on"
    assert vm["display_name"] == "Web 1" and vm["hostname"] == vm["name"]
    assert domain_state(clean_lab, host_index(vm), vm["internal_name"]) == "running"
    root = Path(vm["root_disk"]["path"])
    assert root.exists() and vm["root_disk"]["size_gb"] > 0


async def test_stop_start_reboot_destroy_recover_expunge(client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    name = job["vm"]
    vm = await client.vm(name)
    idx = host_index(vm)
    stop = await client.job("stopVirtualMachine", id=name, forced=True)
    assert stop["status"] == "succeeded"
    assert (await client.vm(name))["state"] == "Stopped"
    assert domain_state(clean_lab, idx, vm["internal_name"]) == "shutoff"
    with pytest.raises(CommandFailed) as refused:
        await client.call("rebootVirtualMachine", id=name)
    assert refused.value.code == "invalid_state" and "Stopped" in str(refused.value)
    assert (await client.job("startVirtualMachine", id=name))["status"] == "succeeded"
    assert domain_state(clean_lab, idx, vm["internal_name"]) == "running"
    # a graceful reboot needs a guest that listens to ACPI: booted, its acpid running (else "ignored", see
    # tests/daemon/test_lifecycle_edges.py); a forced one is a reset and needs nothing of the guest
    assert (await client.job("rebootVirtualMachine", id=name, forced=True))["status"] == "succeeded"
    destroy = await client.job("destroyVirtualMachine", id=name)
    assert destroy["status"] == "succeeded"
    assert (await client.vm(name))["state"] == "Destroyed"
    assert domain_state(clean_lab, idx, vm["internal_name"]) is None
    with pytest.raises(CommandFailed) as refused:
        await client.call("startVirtualMachine", id=name)
    assert refused.value.code == "invalid_state"
    await client.call("recoverVirtualMachine", id=name)
    assert (await client.vm(name))["state"] == "Stopped"
    await client.job("destroyVirtualMachine", id=name)
    assert (await client.job("expungeVirtualMachine", id=name))["status"] == "succeeded"
    assert (await client.vm(name))["state"] == "Expunged"
    assert not Path(vm["root_disk"]["path"]).exists()


async def test_graceful_stop_uses_acpi_on_a_real_kernel(client: Client) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    name = job["vm"]
    await client.wait_vm(name, state="Running")
    # give the guest time to boot and start acpid before pressing the power button
    await _wait_console(client, name, "MOLDD-GUEST-READY")
    stop = await client.job("stopVirtualMachine", id=name)
    assert stop["status"] == "succeeded"
    stopped = [e for e in await client.events(name) if e["event_type"] == "vm.stopped"]
    assert stopped[-1]["payload"]["how"] == "graceful"


async def _wait_console(client: Client, name: str, marker: str, timeout: float = 60.0) -> None:
    import asyncio
    import time

    vm = await client.vm(name)
    log = Path(vm["root_disk"]["path"]).parent / "console.log"
    deadline = time.monotonic() + scaled(timeout)  # a TCG guest boots slowly on a busy machine
    while time.monotonic() < deadline:
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{marker} not on {name}'s console")


async def test_retried_command_id_runs_once(client: Client) -> None:
    first = await client.call("deployVirtualMachine", command_id="deploy-once-1", template="tiny", offering="small", startvm=False)
    again = await client.call("deployVirtualMachine", command_id="deploy-once-1", template="tiny", offering="small", startvm=False)
    assert again["result"]["job"]["id"] == first["result"]["job"]["id"] == "deploy-once-1"
    assert again["position"] == first["position"]
    vms = (await client.call("listVirtualMachines"))["result"]["virtualmachine"]
    assert len(vms) == 1


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"template": "tiny"}, "offering"),
        ({"offering": "small"}, "template"),
        ({"offering": "nope", "template": "tiny"}, "offering"),
        ({"offering": "small", "template": "tiny", "hostname": "9lives"}, "hostname"),
        ({"offering": "small", "template": "tiny", "hostname": "a" * 64}, "hostname"),
        ({"offering": "small", "iso": "installer"}, "rootdisksize"),
        ({"offering": "small", "template": "tiny", "color": "red"}, "color"),
        ({"offering": "small", "template": "tiny", "details": {"boot_mode": "bogus"}}, "details.boot_mode"),
        ({"offering": "small", "template": "tiny", "host": "host9"}, "hostid"),
    ],
)
async def test_bad_deploy_is_refused_and_writes_nothing(client: Client, args: dict[str, Any], field: str) -> None:
    before = (await client.call("listEvents", limit=10000))["result"]["count"]
    with pytest.raises(CommandFailed) as refused:
        await client.call("deployVirtualMachine", **args)
    assert refused.value.field == field, refused.value.error
    assert refused.value.status in (400, 404, 409)
    after = (await client.call("listEvents", limit=10000))["result"]["count"]
    assert after == before


async def test_blank_vm_boots_its_iso_from_an_empty_root_disk(client: Client, clean_lab: Any) -> None:
    import libvirt

    job = await client.job("deployVirtualMachine", iso="installer", offering="small", rootdisksize=2)
    assert job["status"] == "succeeded", job
    vm = await client.vm(job["vm"])
    assert vm["iso"] == "installer" and vm["template"] is None and vm["root_disk"]["size_gb"] == 2
    conn = libvirt.open(clean_lab.hosts[host_index(vm)].uri)
    try:
        xml = conn.lookupByName(vm["internal_name"]).XMLDesc(0)
    finally:
        conn.close()
    assert "empty.iso" in xml and "device='cdrom'" in xml
    assert xml.index("<boot dev='cdrom'/>") < xml.index("<boot dev='hd'/>")


async def test_destroyed_vm_is_expunged_by_the_sweeper_after_the_delay(make_config: Any) -> None:
    import asyncio

    from moldlab.testing.harness import running_daemon

    config = make_config(daemon={"expunge_delay_s": 1, "expunge_sweep_s": 0.2})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        await client.job("destroyVirtualMachine", id=job["vm"])
        assert (await client.vm(job["vm"]))["state"] == "Destroyed"
        gone = await client.wait_vm(job["vm"], timeout=10, state="Expunged")
        assert gone["state"] == "Expunged"
        sweep = [e for e in await client.events(job["vm"]) if e["event_type"] == "vm.expunge.requested"]
        assert sweep[0]["actor"] == "system" and "delay" in sweep[0]["payload"]["reason"]
        await asyncio.sleep(0)


async def test_a_command_that_races_a_libvirt_event_is_checked_again(daemon: Any, client: Client) -> None:
    """An event committed on the VM's stream between a command's check and its append (here: injected once)
    makes the append fail its expected-version check; the command is decided again, not lost or doubled."""
    from events import NewEvent

    job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
    name = job["vm"]
    app = daemon.app
    original = app.async_record
    injected = {"n": 0}

    async def racing_record(vm: Any, event_type: str, payload: dict[str, Any], **kw: Any) -> Any:
        if kw.get("first") and not injected["n"]:
            injected["n"] += 1
            await app.store.async_append(f"vm-{name}", [NewEvent("libvirt.domain_event", {"host": "host0", "event": "DEFINED", "detail": "UPDATED"})])
        return await original(vm, event_type, payload, **kw)

    app.async_record = racing_record  # type: ignore[method-assign]
    try:
        reply = await client.call("startVirtualMachine", id=name)
    finally:
        app.async_record = original  # type: ignore[method-assign]
    done = await client.wait_job(reply["result"]["job"]["id"])
    assert injected["n"] == 1 and done["status"] == "succeeded"
    kinds = [e["event_type"] for e in await client.events(name)]
    assert kinds.count("vm.start.requested") == 1


async def test_a_crashed_job_leaves_no_vm_in_progress(
    daemon: Any, client: Client, clean_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a job (an exception that is not a refusal) used to record only a job failure and leave the VM
    Starting until the next daemon start; now the VM is reconciled with libvirt at once."""
    import moldd.app.lifecycle as lifecycle

    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    name = job["vm"]
    await client.job("stopVirtualMachine", id=name, forced=True)

    def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug in the job")

    monkeypatch.setattr(lifecycle, "domain_spec", boom)
    failed = await client.job("startVirtualMachine", id=name)
    assert failed["status"] == "failed" and failed["error"]["code"] == "internal", failed
    vm = await client.wait_vm(name, timeout=5, state="Stopped")
    assert vm["job"] is None and vm["power_state"] == "off"
    monkeypatch.undo()
    again = await client.job("startVirtualMachine", id=name)
    assert again["status"] == "succeeded", again
    assert domain_state(clean_lab, host_index(vm), vm["internal_name"]) == "running"
