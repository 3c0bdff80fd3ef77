"""A second real client: Apache Libcloud's CloudStack driver (its own signer, its own job polling)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.cloudstack.conftest import CsLab

pytestmark = pytest.mark.libvirt


def driver(lab: CsLab, who: str) -> Any:
    from libcloud.compute.providers import Provider, get_driver

    port = int(lab.endpoint.split(":")[2].split("/")[0])
    key, secret = lab.keys[who]
    cls = get_driver(Provider.CLOUDSTACK)
    drv = cls(key=key, secret=secret, secure=False, host="127.0.0.1", port=port, path="/client/api")
    drv.connection.poll_interval = 0.2
    drv.connection.timeout = 180
    return drv


async def test_libcloud_lists_creates_reboots_and_destroys(cs_lab: CsLab) -> None:
    drv = driver(cs_lab, "operator")

    def create_and_start() -> dict[str, Any]:
        location = drv.list_locations()[0]
        size = next(s for s in drv.list_sizes() if s.name == "small")
        image = drv.list_images()[0]
        node = drv.create_node(name="lc-1", size=size, image=image, location=location)  # startvm=false
        listed = {n.id: n for n in drv.list_nodes()}
        started = drv.ex_start(node)
        return {"location": location, "node": node, "listed": listed, "started": started}

    def reboot_stop_destroy(node: Any) -> dict[str, Any]:
        rebooted = drv.reboot_node(node)
        running = drv.list_nodes()[0].state
        stopped = drv.ex_stop(node)
        destroyed = drv.destroy_node(node)
        return {"rebooted": rebooted, "running": running, "stopped": stopped, "destroyed": destroyed}

    out = await asyncio.to_thread(create_and_start)
    await cs_lab.wait_guest_ready(out["node"].id)  # a graceful (ACPI) reboot needs a booted guest
    out |= await asyncio.to_thread(reboot_stop_destroy, out["node"])
    assert out["location"].name == "c1"
    node = out["node"]
    assert node.name == "lc-1" and len(node.id) == 36 and node.id in out["listed"]
    assert out["listed"][node.id].state == "stopped"  # libcloud deploys with startvm=false
    assert out["started"] == "Running" and out["running"] == "running" and out["stopped"] == "Stopped"
    assert out["rebooted"] is True and out["destroyed"] is True
    vms = (await cs_lab.client.call("listVirtualMachines", id=node.id))["result"]["virtualmachine"]
    assert vms[0]["state"] == "Destroyed"
