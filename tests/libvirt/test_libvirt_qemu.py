"""moldd.libvirt against REAL libvirtd + QEMU (TCG) lab hosts: events, link loss, migration, snapshots."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from moldd.domain.errors import NotFound, OperationFailed, Unavailable, ValidationError
from moldd.libvirt import storage
from moldd.libvirt.host import HostConnection
from moldd.libvirt.xml import DomainSpec, build_domain_xml
from moldlab import GUEST_READY_MARKER, GuestImage
from moldlab.testing.load import scaled
from moldlab.testing.loopwatch import LoopWatch
from moldlab.testing.recorder import Recorder

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
Conns = tuple[HostConnection, HostConnection]


def _name(prefix: str = "vm") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def _blank_spec(disk_dir: Path, name: str, **kw: Any) -> DomainSpec:
    """A guest without an OS (starts in ~0.3 s) on a qcow2 root disk both hosts can see."""
    root = await storage.async_create_blank(disk_dir / f"{name}.qcow2", 64 * MiB)
    kw.setdefault("memory_mib", 64)
    # VNC only where a test needs it: fewer ports to collide with other lab sessions on this machine
    kw.setdefault("vnc", False)
    return DomainSpec(name=name, root_disk=root, serial_log=disk_dir / f"{name}.serial.log", **kw)


def _guest_spec(img: GuestImage, disk_dir: Path, name: str, extra: str = "", **kw: Any) -> DomainSpec:
    """The lab's real Linux guest (answers ACPI)."""
    return DomainSpec(
        name=name,
        kernel=img.kernel,
        initrd=img.initrd,
        cmdline=f"{img.cmdline} {extra}".strip(),
        memory_mib=128,
        serial_log=disk_dir / f"{name}.serial.log",
        **kw,
    )


async def _start(conn: HostConnection, spec: DomainSpec, rec: Recorder) -> None:
    await conn.async_define(build_domain_xml(spec))
    await conn.async_create(spec.name)
    await rec.wait_domain(spec.name, ("STARTED", "BOOTED"), host=conn.name, timeout=20)


async def _wait_for_text(path: Path, text: str, timeout: float = 60.0) -> None:
    async with asyncio.timeout(scaled(timeout)):  # a TCG guest boots slowly on a busy machine
        while True:
            content = await asyncio.to_thread(
                lambda: path.read_text(errors="replace") if path.exists() else ""
            )
            if text in content:
                return
            await asyncio.sleep(0.1)


def _qemu_pid(lab_host: Any, name: str) -> int:
    return int((lab_host.dir / "run" / "qemu" / f"{name}.pid").read_text().strip())


# --- events -------------------------------------------------------------------------------------------


async def test_start_and_destroy_events_arrive_on_the_loop_without_blocking_it(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    async with LoopWatch() as watch:
        await _start(c0, spec, recorder)
        assert await c0.async_domain_state(spec.name) == "running"
        await c0.async_destroy(spec.name)
        await recorder.wait_domain(spec.name, ("STOPPED", "DESTROYED"), timeout=10)
    assert watch.max_blocked < 0.2, watch.worst
    pairs = recorder.pairs(spec.name)
    assert pairs[:3] == [("DEFINED", "ADDED"), ("RESUMED", "UNPAUSED"), ("STARTED", "BOOTED")]
    assert pairs[-1] == ("STOPPED", "DESTROYED")
    assert recorder.off_loop_calls == 0
    assert await c0.async_domain_state(spec.name) == "shutoff"


async def test_killed_qemu_is_stopped_failed(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    await _start(c0, spec, recorder)
    os.kill(_qemu_pid(lab.hosts[0], spec.name), signal.SIGKILL)
    t0 = time.monotonic()
    pairs = await recorder.wait_domain(spec.name, ("STOPPED", "FAILED"), timeout=10)
    print(f"qemu killed: STOPPED/FAILED after {time.monotonic() - t0:.2f}s")
    assert time.monotonic() - t0 < scaled(5)  # a bound for a hang, stretched with the load
    assert pairs[-1] == ("STOPPED", "FAILED")
    assert ("SHUTDOWN", "GUEST") not in pairs
    assert await c0.async_domain_state(spec.name) == "shutoff"


async def test_acpi_shutdown_of_a_real_guest_is_shutdown_guest_then_stopped_shutdown(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, guest_image: GuestImage
) -> None:
    c0, _ = lab_conns
    spec = _guest_spec(guest_image, disk_dir, _name("linux"))
    async with LoopWatch() as watch:
        await _start(c0, spec, recorder)
        assert spec.serial_log is not None
        await _wait_for_text(spec.serial_log, GUEST_READY_MARKER)  # serial pty is also logged to a file
        t0 = time.monotonic()
        await c0.async_shutdown(spec.name)
        pairs = await recorder.wait_domain(spec.name, ("STOPPED", "SHUTDOWN"), timeout=20)
        print(f"ACPI shutdown: STOPPED/SHUTDOWN after {time.monotonic() - t0:.2f}s")
    assert watch.max_blocked < 0.2, watch.worst
    assert pairs.index(("SHUTDOWN", "GUEST")) < pairs.index(("STOPPED", "SHUTDOWN"))
    assert recorder.off_loop_calls == 0


async def test_console_info_reports_vnc_and_serial_pty_and_log(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name(), vnc=True, vnc_password="pa'ss<&>")
    await _start(c0, spec, recorder)
    info = await c0.async_console_info(spec.name)
    assert info["running"] is True
    assert info["vnc"]["listen"] == "127.0.0.1"
    assert info["vnc"]["port"] >= 5900
    assert info["vnc"]["password"] == "pa'ss<&>"
    assert info["serial"]["pty"].startswith("/dev/pts/")
    assert info["serial"]["log"] == str(spec.serial_log)


async def test_list_domains_reports_states_and_persistence(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    running = await _blank_spec(disk_dir, _name("run"))
    stopped = await _blank_spec(disk_dir, _name("off"))
    await _start(c0, running, recorder)
    await c0.async_define(build_domain_xml(stopped))
    by_name = {d.name: d for d in await c0.async_list_domains()}
    assert (by_name[running.name].state, by_name[running.name].persistent) == ("running", True)
    assert (by_name[stopped.name].state, by_name[stopped.name].persistent) == ("shutoff", True)
    assert await c0.async_domain_state("absent") is None
    with pytest.raises(NotFound):
        await c0.async_shutdown("absent")


# --- link loss ------------------------------------------------------------------------------------------


async def test_reconnects_after_libvirtd_is_killed_and_restarted(
    lab_conns: Conns, recorder: Recorder, lab: Any
) -> None:
    c0, _ = lab_conns
    host = lab.hosts[0]
    n = len(recorder.link_events)
    async with LoopWatch() as watch:
        await asyncio.to_thread(host.kill)
        down = await recorder.wait_link(c0.name, "disconnected", after=n, timeout=10)
        assert not c0.connected
        with pytest.raises(Unavailable):
            await c0.async_list_domains()
        await asyncio.to_thread(host.restart)
        t_restarted = time.monotonic()
        await recorder.wait_link(c0.name, "connected", after=n, timeout=15)
        reconnect_delay = time.monotonic() - t_restarted
        print(f"libvirtd restarted: connected again after {reconnect_delay:.2f}s")
        assert await c0.async_list_domains() == []
    assert watch.max_blocked < 0.2, watch.worst
    assert down.reason in ("eof", "error")
    assert reconnect_delay < scaled(6)  # back-off is capped at 5 s (the bound stretches with the load)
    kinds = [e.kind for e in recorder.link_events[n:] if e.host == c0.name]
    assert kinds[0] == "disconnected" and kinds[-1] == "connected"
    # callbacks were re-registered on the new connection: events flow again
    assert recorder.off_loop_calls == 0


async def test_frozen_host_is_detected_by_keepalive_and_never_blocks_the_loop(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    await _start(c0, spec, recorder)
    n = len(recorder.link_events)
    async with LoopWatch() as watch:
        await asyncio.to_thread(lab.hosts[0].freeze)
        t_frozen = time.monotonic()
        # a call to the frozen host fails within a bounded time (the keepalive closes the connection)
        with pytest.raises(Unavailable):
            await c0.async_domain_state(spec.name)
        call_failed_after = time.monotonic() - t_frozen
        down = await recorder.wait_link(c0.name, "disconnected", after=n, timeout=10)
        detected_after = time.monotonic() - t_frozen
        # the other host is unaffected meanwhile
        t1 = time.monotonic()
        assert await c1.async_list_domains() == []
        assert time.monotonic() - t1 < scaled(1)
        # let a reconnect attempt hang on the frozen daemon: wait until one is under way
        deadline = time.monotonic() + scaled(10)
        while c0._pending_open is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert c0._pending_open is not None, "no reconnect attempt to the frozen host"
        await asyncio.to_thread(lab.hosts[0].thaw)
        await recorder.wait_link(c0.name, "connected", after=n, timeout=20)
        # the guest kept running while its host's libvirtd was frozen
        assert await c0.async_domain_state(spec.name) == "running"
    assert watch.max_blocked < 0.2, watch.worst
    assert down.reason == "keepalive"
    assert detected_after < scaled(7)  # keepalive: 7 s on a quiet machine, more on a busy one
    assert call_failed_after < scaled(7)
    print(
        f"frozen host: call failed after {call_failed_after:.1f}s, disconnect seen after {detected_after:.1f}s"
    )


# --- migration ------------------------------------------------------------------------------------------


async def test_live_migration_reports_progress_and_runs_on_the_destination(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name("mig"), memory_mib=128)
    await _start(c0, spec, recorder)
    progress: list[dict[str, Any]] = []
    async with LoopWatch() as watch:
        t0 = time.monotonic()
        # capped bandwidth: an OS-less guest otherwise migrates in well under a second here
        await c0.async_migrate(
            spec.name,
            c1,
            lab.hosts[1].migrate_uri(),
            progress=progress.append,
            unsafe=True,
            bandwidth_mib_s=2,
            poll_interval=0.2,
        )
        took = time.monotonic() - t0
    assert watch.max_blocked < 0.2, watch.worst
    assert await c1.async_domain_state(spec.name) == "running"
    assert await c0.async_domain_state(spec.name) is None  # undefined on the source
    assert [d.persistent for d in await c1.async_list_domains() if d.name == spec.name] == [True]
    assert len(progress) >= 2 and progress[-1]["type"] == "completed"
    assert all(p["type"] in ("unbounded", "bounded", "completed") for p in progress)
    await recorder.wait_domain(spec.name, ("RESUMED", "MIGRATED"), host=c1.name, timeout=10)
    await recorder.wait_domain(spec.name, ("STOPPED", "MIGRATED"), host=c0.name, timeout=10)
    assert ("STARTED", "MIGRATED") in recorder.pairs(spec.name, c1.name)
    print(f"migration took {took:.1f}s, {len(progress)} progress reports: {progress}")


async def test_migration_fails_when_destination_dies_and_guest_keeps_running_on_source(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name("mig"), memory_mib=128)
    await _start(c0, spec, recorder)
    killer: list[asyncio.Task[None]] = []

    def on_progress(p: dict[str, Any]) -> None:
        if not killer:
            killer.append(asyncio.ensure_future(asyncio.to_thread(lab.hosts[1].kill)))

    async with LoopWatch() as watch:
        with pytest.raises(OperationFailed, match="migration of"):
            await c0.async_migrate(
                spec.name,
                c1,
                lab.hosts[1].migrate_uri(),
                progress=on_progress,
                unsafe=True,
                bandwidth_mib_s=2,
                poll_interval=0.2,
            )
    await asyncio.gather(*killer)
    assert killer, "migration ended before the first progress report"
    assert watch.max_blocked < 0.2, watch.worst
    assert await c0.async_domain_state(spec.name) == "running"
    assert [d.persistent for d in await c0.async_list_domains() if d.name == spec.name] == [True]


async def test_migration_to_a_disconnected_host_fails_and_changes_nothing(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    await _start(c0, spec, recorder)
    await c1.async_stop()
    with pytest.raises(OperationFailed, match="not connected"):
        await c0.async_migrate(spec.name, c1, lab.hosts[1].migrate_uri(), unsafe=True)
    assert await c0.async_domain_state(spec.name) == "running"


async def test_migration_on_local_storage_needs_unsafe(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    await _start(c0, spec, recorder)
    with pytest.raises(OperationFailed, match="shared storage is unsafe"):
        await c0.async_migrate(spec.name, c1, lab.hosts[1].migrate_uri())
    assert await c0.async_domain_state(spec.name) == "running"


# --- snapshots ----------------------------------------------------------------------------------------


async def test_memory_snapshot_of_a_running_guest_reverts_to_running(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name("snap"))
    await _start(c0, spec, recorder)
    async with LoopWatch() as watch:
        await c0.async_snapshot_create(spec.name, "s1", memory=True, description="first")
        await c0.async_snapshot_create(spec.name, "s2", memory=True)
        snaps = await c0.async_snapshot_list(spec.name)
        assert [(s.name, s.state, s.memory, s.parent) for s in snaps] == [
            ("s1", "running", True, None),
            ("s2", "running", True, "s1"),
        ]
        assert snaps[0].description == "first" and snaps[1].current
        # power it off: only RAM in the snapshot can bring it back *running*
        await c0.async_destroy(spec.name)
        await c0.async_snapshot_revert(spec.name, "s1")
        assert await c0.async_domain_state(spec.name) == "running"
        assert [s.name for s in await c0.async_snapshot_list(spec.name) if s.current] == ["s1"]
        await c0.async_snapshot_delete(spec.name, "s2")
        await c0.async_snapshot_delete(spec.name, "s1")
        assert await c0.async_snapshot_list(spec.name) == []
    assert watch.max_blocked < 0.2, watch.worst
    assert ("STARTED", "FROM_SNAPSHOT") in recorder.pairs(spec.name)
    with pytest.raises(NotFound):
        await c0.async_snapshot_revert(spec.name, "s1")


async def test_running_guest_refuses_a_disk_only_internal_snapshot_but_a_stopped_one_takes_it(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name("snap"))
    await _start(c0, spec, recorder)
    with pytest.raises(ValidationError) as ei:
        await c0.async_snapshot_create(spec.name, "nomem", memory=False)
    assert ei.value.field == "memory"
    await c0.async_destroy(spec.name)
    await c0.async_snapshot_create(spec.name, "offline", memory=False)
    (snap,) = await c0.async_snapshot_list(spec.name)
    assert (snap.state, snap.memory) == ("shutoff", False)
    await c0.async_snapshot_revert(spec.name, "offline")
    assert await c0.async_domain_state(spec.name) == "shutoff"
    # undefine removes snapshot metadata with the domain
    assert await c0.async_undefine(spec.name) is True
    assert await c0.async_domain_state(spec.name) is None


async def test_migration_is_refused_while_internal_snapshots_exist(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, lab: Any
) -> None:
    c0, c1 = lab_conns
    spec = await _blank_spec(disk_dir, _name("snap"))
    await _start(c0, spec, recorder)
    await c0.async_snapshot_create(spec.name, "s1", memory=True)
    with pytest.raises(OperationFailed, match="snapshot"):
        await c0.async_migrate(spec.name, c1, lab.hosts[1].migrate_uri(), unsafe=True)
    assert await c0.async_domain_state(spec.name) == "running"


# --- live changes ---------------------------------------------------------------------------------------


def _live(xml: str) -> ET.Element:
    return ET.fromstring(xml)


async def test_vcpu_hotplug_and_balloon_on_a_running_guest(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path
) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name(), vcpus=1, max_vcpus=4, memory_mib=128, max_memory_mib=256)
    await _start(c0, spec, recorder)
    await c0.async_set_vcpus(spec.name, 3)
    await c0.async_set_memory(spec.name, 96)
    live = _live(await c0.async_get_xml(spec.name))
    config = _live(await c0.async_get_xml(spec.name, inactive=True))
    assert live.find("vcpu").get("current") == "3"  # type: ignore[union-attr]
    assert config.find("vcpu").get("current") == "3"  # type: ignore[union-attr]
    # The balloon target is stored and handed to QEMU, but the live value is what the guest actually
    # gave back: an OS-less guest (like the lab's Linux guest, which does not load virtio_balloon) keeps
    # all of <memory>.  See the module docstring of moldd.libvirt.xml.
    assert config.findtext("currentMemory") == str(96 * 1024)
    assert live.findtext("currentMemory") in (str(96 * 1024), str(256 * 1024))
    # beyond the maxima fixed at definition
    with pytest.raises(OperationFailed):
        await c0.async_set_vcpus(spec.name, 5)
    with pytest.raises(OperationFailed):
        await c0.async_set_memory(spec.name, 512)
    assert await c0.async_domain_state(spec.name) == "running"


async def test_block_resize_live_and_offline(lab_conns: Conns, recorder: Recorder, disk_dir: Path) -> None:
    c0, _ = lab_conns
    spec = await _blank_spec(disk_dir, _name())
    assert spec.root_disk is not None
    await _start(c0, spec, recorder)
    await c0.async_block_resize(spec.name, "vda", 96 * MiB)
    assert (await storage.async_info(spec.root_disk)).virtual_size == 96 * MiB
    with pytest.raises(NotFound):
        await c0.async_block_resize(spec.name, "vdz", 128 * MiB)
    await c0.async_destroy(spec.name)
    await c0.async_block_resize(spec.name, "vda", 128 * MiB)
    assert (await storage.async_info(spec.root_disk)).virtual_size == 128 * MiB


async def test_cdrom_insert_and_eject_live_and_in_config(
    lab_conns: Conns, recorder: Recorder, disk_dir: Path, guest_image: GuestImage
) -> None:
    c0, _ = lab_conns
    iso = disk_dir / "media.iso"
    iso.write_bytes(b"\0" * (1 * MiB))
    # A booted guest: within ~2 s of start SeaBIOS still probes the drive and QEMU may refuse the
    # change ("Tray ... is not open"), see HostConnection.async_attach_cdrom.
    spec = _guest_spec(guest_image, disk_dir, _name("cd"), cdrom_drive=True)
    await _start(c0, spec, recorder)
    assert spec.serial_log is not None
    await _wait_for_text(spec.serial_log, GUEST_READY_MARKER)

    def cd_source(xml: str) -> str | None:
        for disk in _live(xml).findall("devices/disk"):
            if disk.get("device") == "cdrom":
                src = disk.find("source")
                return None if src is None else src.get("file")
        raise AssertionError("no cdrom")

    await c0.async_attach_cdrom(spec.name, iso)
    assert cd_source(await c0.async_get_xml(spec.name)) == str(iso)
    assert cd_source(await c0.async_get_xml(spec.name, inactive=True)) == str(iso)
    await c0.async_attach_cdrom(spec.name, None)
    assert cd_source(await c0.async_get_xml(spec.name)) is None
    assert cd_source(await c0.async_get_xml(spec.name, inactive=True)) is None
    await c0.async_attach_cdrom(spec.name, iso)
    assert cd_source(await c0.async_get_xml(spec.name)) == str(iso)
    with pytest.raises(NotFound):
        await c0.async_attach_cdrom(spec.name, iso, target="hdd")
    # shut off: config only
    await c0.async_destroy(spec.name)
    await c0.async_attach_cdrom(spec.name, None)
    assert cd_source(await c0.async_get_xml(spec.name, inactive=True)) is None
