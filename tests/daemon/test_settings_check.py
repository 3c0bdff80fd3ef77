"""Advanced settings are checked as a whole when they are set — against the hosts' libvirt capabilities and
against each other — not when the VM next starts (real daemon, real lab hosts running QEMU)."""

from __future__ import annotations

from typing import Any

import pytest

from moldlab.testing.harness import Client

pytestmark = pytest.mark.libvirt


async def refused(client: Client, daemon: Any, verb: str, **args: Any) -> dict[str, Any]:
    head = (await daemon.store.async_head())[0]
    status, reply = await client.raw(verb, args)
    assert status == 400, reply
    assert (await daemon.store.async_head())[0] == head
    error: dict[str, Any] = reply["error"]
    return error


async def test_settings_are_checked_when_set(daemon: Any, client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
    vm = job["vm"]
    error = await refused(client, daemon, "updateVirtualMachineSettings", id=vm, details={"cpu_model": "Bogus-CPU"})
    assert error["field"] == "details.cpu_model" and "host" in error["message"]
    error = await refused(
        client, daemon, "updateVirtualMachineSettings", id=vm, details={"machine": "q35", "disk_bus": "ide"}
    )
    assert error["field"] == "details.disk_bus" and "q35" in error["message"]
    # the template boots a kernel directly: a boot order or UEFI would be silently ignored, so they are refused
    error = await refused(client, daemon, "updateVirtualMachineSettings", id=vm, details={"boot_order": ["cdrom", "hd"]})
    assert error["field"] == "details.boot_order"
    error = await refused(client, daemon, "updateVirtualMachineSettings", id=vm, details={"boot_mode": "uefi"})
    assert error["field"] == "details.boot_mode"
    # the same checks guard updateVirtualMachine and deployVirtualMachine
    error = await refused(client, daemon, "updateVirtualMachine", id=vm, details={"cpu_model": "Bogus-CPU"})
    assert error["field"] == "details.cpu_model"
    error = await refused(
        client, daemon, "deployVirtualMachine", template="tiny", offering="small", details={"cpu_model": "Bogus-CPU"}
    )
    assert error["field"] == "details.cpu_model"
    # a set the hosts support is taken, and the VM really starts with it (q35: its CD-ROM goes on SATA)
    reply = await client.call(
        "updateVirtualMachineSettings", id=vm, details={"machine": "q35", "cpu_model": "qemu64", "disk_bus": "virtio"}
    )
    assert reply["result"]["details_changed"]["machine"] == "q35" and not reply["result"].get("warnings")
    started = await client.job("startVirtualMachine", id=vm)
    assert started["status"] == "succeeded", started
    assert (await client.vm(vm))["state"] == "Running"
