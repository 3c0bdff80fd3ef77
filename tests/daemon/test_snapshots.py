"""VM snapshots against real libvirtd + QEMU: internal qcow2 snapshots, disk-only and with memory, the tree, the
revert rules by state and the per-VM limit, through the socket API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from moldlab.testing.harness import Client
from tests.daemon.conftest import domain_state
from tests.daemon.test_operations import daemon_with, deploy, etype, idx, refused

pytestmark = pytest.mark.libvirt


def libvirt_snapshots(lab: Any, host: int, domain: str) -> dict[str, bool]:
    """{snapshot name: is current} as libvirt itself has them."""
    conn = libvirt.open(lab.hosts[host].uri)
    try:
        dom = conn.lookupByName(domain)
        return {s.getName(): bool(s.isCurrent(0)) for s in dom.listAllSnapshots(0)}
    finally:
        conn.close()


async def snapshots(client: Client, vm: str) -> list[dict[str, Any]]:
    return list((await client.call("listVMSnapshots", id=vm))["result"]["vmSnapshot"])


async def test_disk_snapshots_of_a_stopped_vm_form_a_tree_and_revert(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client, startvm=False)
    name, dom, h = vm["name"], vm["internal_name"], idx(vm)
    mem = await refused(client, "createVMSnapshot", id=name, snapshotmemory=True)
    assert mem.code == "invalid_state" and "Created" in mem.error["message"]
    first = await client.job("createVMSnapshot", id=name, name="s1", description="clean install")
    assert first["status"] == "succeeded", first
    assert (await client.job("createVMSnapshot", vm=name, snapshot="s2"))["status"] == "succeeded"
    listed = await snapshots(client, name)
    assert [(s["name"], s["parent_name"], s["current"], s["memory"], s["state"]) for s in listed] == [
        ("s1", None, False, False, "Ready"), ("s2", "s1", True, False, "Ready")]  # fmt: skip
    assert listed[0]["description"] == "clean install"
    assert libvirt_snapshots(clean_lab, h, dom) == {"s1": False, "s2": True}
    assert (await refused(client, "createVMSnapshot", id=name, name="s1")).code == "conflict"
    # snapshots block what qcow2/libvirt cannot do with them
    assert (await refused(client, "restoreVirtualMachine", id=name)).code == "invalid_state"
    assert (
        await refused(client, "migrateVirtualMachine", id=name, host=f"host{1 - h}")
    ).code == "invalid_state"
    assert (await refused(client, "resizeVolume", id=name, size=2)).code == "invalid_state"
    job = await client.job("revertToVMSnapshot", id=name, name="s1")
    assert job["status"] == "succeeded", job
    assert [s["name"] for s in await snapshots(client, name) if s["current"]] == ["s1"]
    assert libvirt_snapshots(clean_lab, h, dom)["s1"] is True
    assert (await client.vm(name))["state"] == "Created"
    # s3 branches off s1; deleting s1 moves its children up
    await client.job("createVMSnapshot", id=name, name="s3")
    s1 = next(s for s in await snapshots(client, name) if s["name"] == "s1")
    assert (await client.job("deleteVMSnapshot", vmsnapshotid=s1["vmsnapshotid"]))["status"] == "succeeded"
    tree = {s["name"]: (s["parent_name"], s["current"]) for s in await snapshots(client, name)}
    assert tree == {"s2": (None, False), "s3": (None, True)}
    assert libvirt_snapshots(clean_lab, h, dom) == {"s2": False, "s3": True}
    types = [etype(e) for e in await client.events(name, "vmsnapshot")]
    assert types.count("vmsnapshot.created") == 3 and types.count("vmsnapshot.deleted") == 1
    assert "vmsnapshot.reverted" in types
    assert (await refused(client, "deleteVMSnapshot", id=name, name="s1")).code == "not_found"


async def test_memory_snapshot_reverts_a_stopped_vm_to_running(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client)
    name, dom, h = vm["name"], vm["internal_name"], idx(vm)
    disk_only = await refused(client, "createVMSnapshot", id=name, name="d1")
    assert disk_only.code == "invalid_state" and "Running" in disk_only.error["message"]
    job = await client.job("createVMSnapshot", id=name, name="m1", snapshotmemory=True)
    assert job["status"] == "succeeded", job
    (snap,) = await snapshots(client, name)
    assert snap["memory"] is True and snap["type"] == "DiskAndMemory" and snap["current"]
    await client.job("stopVirtualMachine", id=name, forced=True)
    assert domain_state(clean_lab, h, dom) == "shutoff"
    job = await client.job("revertToVMSnapshot", vmsnapshotid=snap["vmsnapshotid"])
    assert job["status"] == "succeeded", job
    after = await client.vm(name)
    assert (after["state"], after["power_state"]) == ("Running", "on")
    assert domain_state(clean_lab, h, dom) == "running"
    # a disk-only snapshot taken while stopped cannot be reverted while the VM runs
    await client.job("stopVirtualMachine", id=name, forced=True)
    await client.job("createVMSnapshot", id=name, name="d1")
    await client.job("startVirtualMachine", id=name)
    rule = await refused(client, "revertToVMSnapshot", id=name, name="d1")
    assert rule.code == "invalid_state" and "stop the VM first" in rule.error["message"]
    assert (await client.vm(name))["state"] == "Running"


async def test_snapshot_limit_per_vm(make_config: Callable[..., Any]) -> None:
    async with daemon_with(make_config(daemon={"max_vm_snapshots": 2})) as client:
        vm = await deploy(client, startvm=False)
        await client.job("createVMSnapshot", id=vm["name"])
        await client.job("createVMSnapshot", id=vm["name"])
        names = [s["name"] for s in await snapshots(client, vm["name"])]
        assert len(set(names)) == 2 and all(n.startswith(f"{vm['name']}_snap_") for n in names)
        full = await refused(client, "createVMSnapshot", id=vm["name"])
        assert (full.code, full.field) == ("snapshot_limit", "id") and "limit is 2" in full.error["message"]
