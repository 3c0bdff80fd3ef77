"""VM management beyond the lifecycle, against real libvirtd hosts and QEMU guests, through the socket API:
edit, internal name, change offering, hot scale, resize, migrate, reinstall, settings, console, ISO, capacity."""

from __future__ import annotations

import asyncio
import io
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import libvirt
import pytest

from moldd.config import load_config
from moldlab.testing.harness import Client, CommandFailed, running_daemon
from moldlab.testing.load import scaled
from tests.daemon.conftest import domain_state

pytestmark = pytest.mark.libvirt
GIB = 1024**3

EXTRA_OFFERINGS = """
[[offerings]]
name = "small-plus"
vcpus = 2
memory_mib = 192
dynamic = true
max_vcpus = 2
max_memory_mib = 256

[[offerings]]
name = "big-dyn"
vcpus = 4
memory_mib = 256
dynamic = true
max_vcpus = 4
max_memory_mib = 512
"""


def idx(vm: dict[str, Any]) -> int:
    return int(vm["host"].removeprefix("host"))


def domain_xml(lab: Any, host: int, domain: str, inactive: bool = False) -> ET.Element:
    conn = libvirt.open(lab.hosts[host].uri)
    try:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return ET.fromstring(conn.lookupByName(domain).XMLDesc(flags))
    finally:
        conn.close()


def image_info(path: str) -> dict[str, Any]:
    import json

    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def etype(entry: dict[str, Any]) -> str:
    """An event's type in a listEvents reply (the view's key is being renamed from "type" to "event_type")."""
    return str(entry.get("event_type") or entry.get("type"))


def exists(path: str) -> bool:
    return Path(path).exists()


async def commanded_events(client: Client) -> list[dict[str, Any]]:
    """The log's events except libvirt's own domain events, which land whenever a guest's QEMU reports one (a
    guest still booting may report RESUMED while a refused command is answered)."""
    events = (await client.call("listEvents", limit=10000))["result"]["event"]
    return [e for e in events if e["actor"] != "libvirt"]


async def refused(client: Client, verb: str, **args: Any) -> CommandFailed:
    """The command is refused and nothing is written to the log."""
    before = await commanded_events(client)
    with pytest.raises(CommandFailed) as exc:
        await client.call(verb, **args)
    assert await commanded_events(client) == before, f"{verb} wrote to the log although refused"
    return exc.value


@asynccontextmanager
async def daemon_with(config: Any) -> AsyncIterator[Client]:
    async with running_daemon(config) as d, Client(d.config.socket) as c:
        yield c


def with_offerings(make_config: Callable[..., Any], **kw: Any) -> Any:
    cfg = make_config(**kw)
    cfg.path.write_text(cfg.path.read_text() + EXTRA_OFFERINGS)
    return load_config(cfg.path)


async def deploy(client: Client, **args: Any) -> dict[str, Any]:
    args = {"template": "tiny", "offering": "small"} | args
    job = await client.job("deployVirtualMachine", **args)
    assert job["status"] == "succeeded", job
    return await client.vm(job["vm"])


async def wait_console(vm: dict[str, Any], marker: str, timeout: float = 60.0) -> None:
    log = Path(vm["root_disk"]["path"]).parent / "console.log"
    for _ in range(int(scaled(timeout) / 0.2)):  # a TCG guest boots slowly on a busy machine
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{marker} not on {vm['name']}'s console")


# -- edit basic info, groups, internal name ---------------------------------------------------------------
async def test_edit_basic_info_records_vm_updated_and_keeps_the_name(client: Client) -> None:
    await client.call("createInstanceGroup", name="web")
    vm = await deploy(client, startvm=False)
    other = await deploy(client, startvm=False, hostname="taken")
    name = vm["name"]
    reply = await client.call(
        "updateVirtualMachine", id=name, displayname="Web 1", hostname="web-1", group="web", ha=True,
        hapolicy="on-failure", hapriority=5, ostype="Debian", description="front end",
    )  # fmt: skip
    changed = reply["result"]["changed"]
    assert changed == {"display_name": "Web 1", "hostname": "web-1", "group": "web", "ha_enabled": True,
                       "ha_policy": "on-failure", "ha_priority": 5, "os_type": "Debian",
                       "description": "front end"}  # fmt: skip
    vm2 = await client.vm(name)
    assert (vm2["name"], vm2["display_name"], vm2["hostname"], vm2["group"]) == (
        name,
        "Web 1",
        "web-1",
        "web",
    )
    assert vm2["internal_name"] == vm["internal_name"] == f"i-2-{vm['id']}-VM"
    updated = await client.events(name, "vm.updated")
    assert updated[-1]["payload"] == {"changes": changed}
    # group filter, then "" removes the group
    in_web = (await client.call("listVirtualMachines", group="web"))["result"]["virtualmachine"]
    assert [v["name"] for v in in_web] == [name]
    await client.call("updateVirtualMachine", id=name, group="")
    assert (await client.vm(name))["group"] is None
    assert (await client.call("listVirtualMachines", group="web"))["result"]["count"] == 0
    await client.call("updateVirtualMachine", id=other["name"], group="web")
    groups = (await client.call("listInstanceGroups"))["result"]["instancegroup"]
    assert groups[0]["vms"] == [other["name"]]
    # refusals, none of which writes anything
    assert (await refused(client, "updateVirtualMachine", id=name, name="vm-renamed")).field == "name"
    assert (await refused(client, "updateVirtualMachine", id=name, vmname="vm-renamed")).field == "vmname"
    conflict = await refused(client, "updateVirtualMachine", id=name, hostname="taken")
    assert (conflict.code, conflict.field) == ("conflict", "hostname")
    assert (await refused(client, "updateVirtualMachine", id=name, hostname="1abc")).field == "hostname"
    assert (await refused(client, "updateVirtualMachine", id=name, group="nope")).code == "not_found"
    assert (await refused(client, "updateVirtualMachine", id=name, colour="red")).field == "colour"
    # the same name is not a rename: moldctl's `vm edit NAME` sends it
    await client.call("updateVirtualMachine", name=name, displayname="Web One")
    assert (await client.vm(name))["display_name"] == "Web One"
    await client.job("destroyVirtualMachine", id=name)
    bad = await refused(client, "updateVirtualMachine", id=name, displayname="x")
    assert bad.code == "invalid_state" and "Destroyed" in str(bad)


async def test_internal_name_follows_pattern_with_display_name_appended(
    make_config: Callable[..., Any], clean_lab: Any
) -> None:
    cfg = make_config(daemon={"append_display_name": True, "account": "7", "instance_suffix": "MOLD"})
    async with daemon_with(cfg) as client:
        vm = await deploy(client, startvm=False, displayname="Web Server 1")
        expected = f"i-7-{vm['id']}-MOLD-web-server-1"
        assert vm["internal_name"] == expected
        assert domain_xml(clean_lab, idx(vm), expected).findtext("name") == expected
        await client.call("updateVirtualMachine", id=vm["name"], displayname="Renamed")
        shown = await client.vm(vm["name"])
        assert shown["internal_name"] == expected and shown["display_name"] == "Renamed"
        # the VM is found by its internal name too
        assert (await client.vm(expected))["name"] == vm["name"]


# -- change offering and hot scale --------------------------------------------------------------------------
async def test_change_offering_while_stopped_applies_at_next_start(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client, startvm=False)
    name = vm["name"]
    assert (
        await refused(client, "changeServiceForVirtualMachine", id=name, offering="small")
    ).field == "offering"
    assert (
        await refused(client, "changeServiceForVirtualMachine", id=name, offering="nope")
    ).code == "not_found"
    await client.call("changeServiceForVirtualMachine", id=name, serviceofferingid="medium")
    assert (await client.vm(name))["offering"]["name"] == "medium"
    assert (await client.events(name, "vm.offering.changed"))[-1]["payload"]["previous"]["name"] == "small"
    assert (await client.job("startVirtualMachine", id=name))["status"] == "succeeded"
    live = domain_xml(clean_lab, idx(vm), vm["internal_name"])
    assert live.find("vcpu").get("current", live.findtext("vcpu")) == "2"  # type: ignore[union-attr]
    assert int(live.findtext("currentMemory") or 0) == 192 * 1024
    running = await refused(client, "changeServiceForVirtualMachine", id=name, offering="small")
    assert running.code == "invalid_state" and "Running" in running.error["message"]
    assert "scaleVirtualMachine" in running.error["message"]


async def test_hot_scale_up_of_a_running_vm_within_its_maxima(
    make_config: Callable[..., Any], clean_lab: Any
) -> None:
    async with daemon_with(with_offerings(make_config)) as client:
        vm = await deploy(client)
        name = vm["name"]
        await wait_console(vm, "MOLDD-GUEST-READY")  # its virtio_balloon driver is loaded by then
        assert (await refused(client, "scaleVirtualMachine", id=name, offering="medium")).field == "offering"
        too_big = await refused(client, "scaleVirtualMachine", id=name, offering="big-dyn")
        assert "maximum of 2" in too_big.error["message"]
        job = await client.job("scaleVirtualMachine", id=name, offering="small-plus")
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert (result["offering"], result["vcpus"], result["memory_mib"]) == ("small-plus", 2, 192)
        live = domain_xml(clean_lab, idx(vm), vm["internal_name"])
        assert live.find("vcpu").get("current", live.findtext("vcpu")) == "2"  # type: ignore[union-attr]
        assert int(live.findtext("memory") or 0) == 256 * 1024  # the maximum fixed at start
        # memory is a virtio-balloon target (no DIMM hot-plug on TCG), persisted for the next boot too; the
        # guest's balloon driver hands the memory over: QEMU's own balloon figure follows
        config = domain_xml(clean_lab, idx(vm), vm["internal_name"], inactive=True)
        assert int(config.findtext("currentMemory") or 0) == 192 * 1024
        assert result["memory_reported_mib"] == 192
        assert await balloon_actual_mib(clean_lab, idx(vm), vm["internal_name"], 192) == 192
        now = await client.vm(name)
        assert now["offering"]["name"] == "small-plus" and now["state"] == "Running"
        down = await refused(client, "scaleVirtualMachine", id=name, offering="small")
        assert "only goes up" in down.error["message"]
        await client.job("stopVirtualMachine", id=name, forced=True)
        stopped = await refused(client, "scaleVirtualMachine", id=name, offering="small-plus")
        assert stopped.code == "invalid_state" and "Stopped" in stopped.error["message"]


async def balloon_actual_mib(lab: Any, index: int, domain: str, want: int, timeout: float = 10.0) -> int:
    """The memory QEMU's balloon says the guest has (libvirt's memoryStats "actual"), once it reaches ``want``."""
    conn = libvirt.open(lab.hosts[index].uri)
    try:
        dom = conn.lookupByName(domain)
        actual = 0
        for _ in range(int(timeout / 0.2)):
            actual = int(dom.memoryStats().get("actual", 0)) // 1024
            if actual == want:
                break
            await asyncio.sleep(0.2)
        return actual
    finally:
        conn.close()


# -- root disk -------------------------------------------------------------------------------------------------
async def test_resize_root_disk_grows_live_and_shrinks_only_stopped_with_shrinkok(client: Client) -> None:
    vm = await deploy(client)
    name, path = vm["name"], vm["root_disk"]["path"]
    job = await client.job("resizeVolume", id=name, size=1)
    assert job["status"] == "succeeded", job
    assert image_info(path)["virtual-size"] == 1 * GIB
    assert (await client.vm(name))["root_disk"]["size_gb"] == 1.0
    resized = (await client.events(name, "vm.volume.resized"))[-1]["payload"]
    assert resized["new_size_gb"] == 1.0 and resized["live"] is True and resized["old_size_gb"] < 1
    assert (await refused(client, "resizeVolume", id=name, size=1)).field == "size"
    await client.job("resizeVolume", id=name, size=2)
    shrink_running = await refused(client, "resizeVolume", id=name, size=1, shrinkok=True)
    assert shrink_running.code == "invalid_state" and "Running" in shrink_running.error["message"]
    await client.job("stopVirtualMachine", id=name, forced=True)
    assert (await refused(client, "resizeVolume", id=name, size=1)).field == "shrinkok"
    job = await client.job("resizeVolume", id=name, size=1, shrinkok=True)
    assert job["status"] == "succeeded", job
    assert image_info(path)["virtual-size"] == 1 * GIB
    assert (await client.vm(name))["root_disk"]["size_gb"] == 1.0


# -- migrate ---------------------------------------------------------------------------------------------------
async def test_live_migration_moves_a_running_vm_and_records_progress(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client, host="host0")
    name, dom = vm["name"], vm["internal_name"]
    assert (await refused(client, "migrateVirtualMachine", id=name, host="host0")).field == "host"
    assert (await refused(client, "migrateVirtualMachine", id=name, host="host9")).code == "not_found"
    job = await client.job("migrateVirtualMachine", id=name, host="host1")
    assert job["status"] == "succeeded", job
    assert job["progress"] is not None and job["progress"]["type"] == "completed"
    after = await client.vm(name)
    assert (after["state"], after["host"]) == ("Running", "host1")
    assert domain_state(clean_lab, 1, dom) == "running"
    assert domain_state(clean_lab, 0, dom) is None
    types = [e["event_type"] for e in await client.events(name) if e["correlation_id"] == job["id"]]
    assert types[0] == "vm.migrate.requested" and types[-1] == "vm.migrated"
    assert "vm.migrate.progress" in types
    # late MIGRATED events from both hosts must not change the VM: wait until both are in the log
    async def migrated_events() -> set[str]:
        return {
            e["payload"]["host"]
            for e in await client.events(name, type="libvirt.domain_event")
            if e["payload"].get("detail") == "MIGRATED"
        }

    for _ in range(int(scaled(30) / 0.05)):
        if await migrated_events() == {"host0", "host1"}:
            break
        await asyncio.sleep(0.05)
    assert await migrated_events() == {"host0", "host1"}
    assert (await client.vm(name))["state"] == "Running"
    await client.job("destroyVirtualMachine", id=name)
    gone = await refused(client, "migrateVirtualMachine", id=name, host="host0")
    assert gone.code == "invalid_state" and "Destroyed" in gone.error["message"]


async def test_failed_migration_leaves_the_vm_running_on_its_host(
    make_config: Callable[..., Any], clean_lab: Any
) -> None:
    cfg = make_config()
    # host1's QEMU cannot listen on an address this machine does not have: the migration must fail
    uri = f'migration_uri = "{clean_lab.hosts[1].migrate_uri()}"'
    assert uri in cfg.path.read_text()
    cfg.path.write_text(cfg.path.read_text().replace(uri, 'migration_uri = "tcp://192.0.2.1"'))
    async with daemon_with(load_config(cfg.path)) as client:
        vm = await deploy(client, host="host0")
        job = await client.job("migrateVirtualMachine", id=vm["name"], host="host1")
        assert job["status"] == "failed" and "migration" in job["error"]["message"]
        after = await client.vm(vm["name"])
        assert (after["state"], after["host"]) == ("Running", "host0")
        assert domain_state(clean_lab, 0, vm["internal_name"]) == "running"
        assert domain_state(clean_lab, 1, vm["internal_name"]) is None
        failed = (await client.events(vm["name"], "vm.migrate.failed"))[-1]["payload"]
        assert failed["state"] == "Running" and failed["host"] == "host0"


async def test_offline_move_rehomes_a_stopped_vm(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client, host="host0", startvm=False)
    job = await client.job("migrateVirtualMachine", id=vm["name"], host="host1")
    assert job["status"] == "succeeded", job
    moved = await client.vm(vm["name"])
    assert (moved["state"], moved["host"]) == ("Created", "host1")
    assert (await client.events(vm["name"], "vm.migrated"))[-1]["payload"]["offline"] is True
    assert domain_state(clean_lab, 0, vm["internal_name"]) is None
    assert (await client.job("startVirtualMachine", id=vm["name"]))["status"] == "succeeded"
    assert domain_state(clean_lab, 1, vm["internal_name"]) == "running"


async def test_migration_to_a_full_host_is_refused(make_config: Callable[..., Any]) -> None:
    async with daemon_with(make_config(max_vms=1, daemon={"tolerated_host_failures": 0})) as client:
        a = await deploy(client, host="host0", startvm=False)
        await deploy(client, host="host1", startvm=False)
        full = await refused(client, "migrateVirtualMachine", id=a["name"], host="host1")
        assert (full.code, full.field) == ("insufficient_capacity", "host") and "full" in full.error[
            "message"
        ]


# -- capacity --------------------------------------------------------------------------------------------------
async def test_capacity_limit_refuses_the_third_vm_and_warns_once(make_config: Callable[..., Any]) -> None:
    cfg = make_config(max_vms=2)
    async with daemon_with(cfg) as client:
        await deploy(client, startvm=False)
        await deploy(client, startvm=False)
        full = await refused(client, "deployVirtualMachine", template="tiny", offering="small", startvm=False)
        # no host was asked for: no field is to blame (it used to name hostid)
        assert (full.code, full.field) == ("insufficient_capacity", None)
        (cluster,) = (await client.call("listClusters"))["result"]["cluster"]
        assert (cluster["used"], cluster["limit"], cluster["headroom"]) == (2, 2, 0)
        warnings = await client.events_of_stream("cluster-c1")
        assert [e["event_type"] for e in warnings] == ["cluster.capacity_low"]
        assert warnings[0]["payload"]["headroom"] == 1 and warnings[0]["payload"]["threshold"] == 1
        from moldd.cli.moldctl import run

        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(run, ["--socket", str(cfg.socket), "capacity"], out, err)
        assert code == 0, err.getvalue()
        text = out.getvalue()
        assert "HEADROOM" in text and "LIMIT" in text and "USED" in text


# -- reinstall ---------------------------------------------------------------------------------------------------
async def test_restore_gives_a_running_vm_a_new_root_disk_and_restarts_it(
    client: Client, clean_lab: Any
) -> None:
    vm = await deploy(client)
    name, old = vm["name"], vm["root_disk"]["path"]
    job = await client.job("restoreVirtualMachine", id=name)
    assert job["status"] == "succeeded", job
    after = await client.vm(name)
    new = after["root_disk"]["path"]
    assert new != old and exists(new) and not exists(old)
    assert after["state"] == "Running" and after["template"] == "tiny"
    assert image_info(new)["backing-filename"].endswith("tiny.qcow2")
    live = domain_xml(clean_lab, idx(after), vm["internal_name"])
    assert live.find("devices/disk/source").get("file") == new  # type: ignore[union-attr]
    types = [e["event_type"] for e in await client.events(name) if e["correlation_id"] == job["id"]]
    assert types == ["vm.restore.requested", "vm.stop.requested", "vm.stopped", "vm.restored",
                     "vm.start.requested", "vm.started"]  # fmt: skip
    restored = (await client.events(name, "vm.restored"))[-1]["payload"]
    assert (
        restored["template"] == "tiny"
        and restored["os_type"] == "Linux"
        and restored["root_disk"]["path"] == new
    )


async def test_restore_of_a_blank_vm_needs_a_template_and_changes_its_os(client: Client) -> None:
    vm = await deploy(client, template=None, iso="installer", rootdisksize=1, startvm=False)
    name = vm["name"]
    assert (await refused(client, "restoreVirtualMachine", id=name)).field == "template"
    assert (await refused(client, "restoreVirtualMachine", id=name, template="nope")).code == "not_found"
    job = await client.job("restoreVirtualMachine", id=name, template="tiny")
    assert job["status"] == "succeeded", job
    after = await client.vm(name)
    assert (after["template"], after["os_type"], after["state"]) == ("tiny", "Linux", "Created")
    assert image_info(after["root_disk"]["path"])["virtual-size"] == 1 * GIB  # kept the larger size


# -- advanced settings and console ------------------------------------------------------------------------------
async def test_settings_are_validated_merged_and_applied_at_next_start(
    client: Client, clean_lab: Any
) -> None:
    vm = await deploy(client, template=None, iso="installer", rootdisksize=1, startvm=False)
    name = vm["name"]
    bad = await refused(client, "updateVirtualMachine", id=name, details={"boot_order": ["floppy"]})
    assert bad.field == "details.boot_order"
    assert (
        await refused(client, "updateVirtualMachineSettings", id=name, details={"x": 1})
    ).field == "details.x"
    # kernel_args would have no effect on a VM that boots from its disk/ISO: refused, not silently ignored
    no_effect = await refused(
        client, "updateVirtualMachine", id=name, details={"boot_order": ["hd", "cdrom"], "kernel_args": "a=1"}
    )
    assert no_effect.field == "details.kernel_args"
    await client.call("updateVirtualMachine", id=name, details={"boot_order": ["hd", "cdrom"]})
    reply = await client.call(
        "updateVirtualMachineSettings", id=name, details={"cpu_model": "qemu64", "vnc_password": "s3cret",
                                                          "kernel_args": None},
    )  # fmt: skip
    details = reply["result"]["vm"]["details"]
    assert details.pop("vnc_password")["secret"] == "set"  # a secret: a marker in the log and the API
    assert details == {"boot_order": ["hd", "cdrom"], "cpu_model": "qemu64"}
    assert [e["event_type"] for e in await client.events(name, "vm.settings.changed")] == [
        "vm.settings.changed"
    ] * 2
    stopped = await refused(client, "getVirtualMachineConsole", id=name)
    assert stopped.code == "invalid_state" and "Created" in stopped.error["message"]
    assert (await client.job("startVirtualMachine", id=name))["status"] == "succeeded"
    live = domain_xml(clean_lab, idx(vm), vm["internal_name"])
    assert [b.get("dev") for b in live.findall("os/boot")] == ["hd", "cdrom"]
    assert live.findtext("cpu/model") == "qemu64"
    console = (await client.call("getVirtualMachineConsole", id=name))["result"]
    assert console["vnc"]["port"] >= 5900 and console["vnc"]["password"] == "s3cret"
    assert console["vnc"]["host"] == "127.0.0.1"
    assert console["serial"]["pty"].startswith("/dev/pts/") and console["serial"]["log"].endswith(
        "console.log"
    )


async def test_moldctl_console_prints_the_endpoint_and_follows_the_serial_log(client: Client) -> None:
    from moldd.cli.moldctl import run

    vm = await deploy(client)
    sock = client.socket_path
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run, ["--socket", sock, "console", vm["name"]], out, err)
    assert code == 0, err.getvalue()
    assert "vnc" in out.getvalue() and "127.0.0.1:" in out.getvalue() and "/dev/pts/" in out.getvalue()
    await wait_console(vm, "MOLDD-GUEST-READY")
    out = io.StringIO()
    argv = ["--socket", sock, "console", vm["name"], "--follow", "--for", "1"]
    code = await asyncio.to_thread(run, argv, out, err)
    assert code == 0, err.getvalue()
    assert "MOLDD-GUEST-READY" in out.getvalue()


# -- ISO ---------------------------------------------------------------------------------------------------------
async def test_attach_and_detach_iso_live_and_in_config(client: Client, clean_lab: Any) -> None:
    vm = await deploy(client)
    name, dom, h = vm["name"], vm["internal_name"], idx(vm)
    await wait_console(vm, "MOLDD-GUEST-READY")  # SeaBIOS probing the drive right after boot holds the tray
    assert (await refused(client, "attachIso", id=name, iso="nope")).code == "not_found"
    assert (await refused(client, "detachIso", id=name)).field == "iso"
    job = await client.job("attachIso", id=name, iso="installer")
    assert job["status"] == "succeeded", job
    iso_path = client_iso = None
    for inactive in (False, True):
        cdrom = next(d for d in domain_xml(clean_lab, h, dom, inactive).findall("devices/disk")
                     if d.get("device") == "cdrom")  # fmt: skip
        client_iso = cdrom.find("source").get("file")  # type: ignore[union-attr]
        iso_path = iso_path or client_iso
        assert client_iso is not None and client_iso.endswith("empty.iso")
    assert (await client.vm(name))["iso"] == "installer"
    assert (await refused(client, "attachIso", id=name, iso="installer")).code == "conflict"
    assert (await client.job("detachIso", id=name))["status"] == "succeeded"
    cdrom = next(
        d for d in domain_xml(clean_lab, h, dom).findall("devices/disk") if d.get("device") == "cdrom"
    )
    assert cdrom.find("source") is None or cdrom.find("source").get("file") is None  # type: ignore[union-attr]
    assert (await client.vm(name))["iso"] is None
    await client.job("stopVirtualMachine", id=name, forced=True)
    assert (await client.job("attachIso", id=name, iso="installer"))["status"] == "succeeded"
    cdrom = next(
        d for d in domain_xml(clean_lab, h, dom, True).findall("devices/disk") if d.get("device") == "cdrom"
    )
    assert cdrom.find("source").get("file") == iso_path  # type: ignore[union-attr]
    assert [e["event_type"] for e in await client.events(name, "vm.iso")] == [
        "vm.iso.attach.requested", "vm.iso.attached", "vm.iso.detach.requested", "vm.iso.detached",
        "vm.iso.attach.requested", "vm.iso.attached",
    ]  # fmt: skip
