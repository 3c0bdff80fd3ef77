"""The lab harness against REAL libvirtd + QEMU (TCG): hosts, guest, events, migration, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from moldlab import GUEST_READY_MARKER, GuestImage, Lab, LabHost, domain_xml
from moldlab.events import LifecycleRecorder
from moldlab.hosts import host_processes, pid_alive
from moldlab.testing.load import scaled

pytestmark = pytest.mark.libvirt

E = libvirt
RESUMED_UNPAUSED = (E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
STARTED_BOOTED = (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED)
SHUTDOWN_GUEST = (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)
SHUTDOWN_HOST = (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_HOST)
STOPPED_SHUTDOWN = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
STOPPED_FAILED = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_FAILED)
STOPPED_DESTROYED = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
STOPPED_MIGRATED = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)
SUSPENDED_MIGRATED = (E.VIR_DOMAIN_EVENT_SUSPENDED, E.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED)
STARTED_MIGRATED = (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_MIGRATED)
RESUMED_MIGRATED = (E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_MIGRATED)


def test_event_table_numbers_match_libvirt_constants() -> None:
    """The numbers in /work/shared/libvirt-lab.md's event table (and moldlab.events' docstring)."""
    assert RESUMED_UNPAUSED == (4, 0)
    assert STARTED_BOOTED == (2, 0)
    assert SHUTDOWN_GUEST == (6, 1)
    assert SHUTDOWN_HOST == (6, 2)
    assert STOPPED_SHUTDOWN == (5, 0)
    assert STOPPED_FAILED == (5, 5)
    assert STOPPED_DESTROYED == (5, 1)
    assert STOPPED_MIGRATED == (5, 3)
    assert SUSPENDED_MIGRATED == (3, 1)
    assert STARTED_MIGRATED == (2, 1)
    assert RESUMED_MIGRATED == (4, 1)
    assert E.VIR_CONNECT_CLOSE_REASON_KEEPALIVE == 2
    assert E.VIR_CONNECT_CLOSE_REASON_EOF == 1


# ---- helpers -----------------------------------------------------------------------------------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Guest:
    def __init__(self, host: LabHost, conn: libvirt.virConnect, image: GuestImage, name: str,
                 cmdline_extra: str = "", memory_mib: int = 128) -> None:
        self.host = host
        self.name = name
        self.serial = host.dir / f"{name}.serial"
        self.dom = conn.createXML(
            domain_xml(name, image, memory_mib=memory_mib, serial_log=self.serial, cmdline_extra=cmdline_extra), 0
        )

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> float:
        timeout = scaled(timeout)  # a TCG guest boots slowly on a busy machine
        t0 = time.monotonic()
        while GUEST_READY_MARKER not in self.console():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name} did not boot; console:\n{self.console()[-2000:]}")
            time.sleep(0.05)
        return time.monotonic() - t0


@pytest.fixture
def conns(lab_healthy: Lab) -> Iterator[tuple[libvirt.virConnect, libvirt.virConnect]]:
    c0 = libvirt.open(lab_healthy.hosts[0].uri)
    c1 = libvirt.open(lab_healthy.hosts[1].uri)
    yield c0, c1
    for c in (c0, c1):
        try:
            c.close()
        except libvirt.libvirtError:
            pass


@pytest.fixture
def rec0(conns: tuple[libvirt.virConnect, libvirt.virConnect]) -> Iterator[LifecycleRecorder]:
    r = LifecycleRecorder(conns[0])
    yield r
    r.close()


# ---- hosts -------------------------------------------------------------------------------------


def test_hosts_are_independent(lab_healthy: Lab, conns: tuple[libvirt.virConnect, libvirt.virConnect],
                               guest_image: GuestImage) -> None:
    h0, h1 = lab_healthy.hosts
    c0, c1 = conns
    # libvirtd is the direct child (exec): the pid we signal is the daemon's own pid
    for h in (h0, h1):
        assert h.pid is not None
        assert Path(f"/proc/{h.pid}/comm").read_text().strip() == "libvirtd"
        assert int((h.dir / "pid").read_text()) == h.pid
        assert host_processes(h.dir) == {h.pid: "libvirtd"}
        assert h.uri == f"qemu+unix:///system?socket={h.dir}/run/libvirt-sock"
    uuids = [ET.fromstring(c.getCapabilities()).findtext("host/uuid") for c in (c0, c1)]
    assert uuids == [h0.host_uuid, h1.host_uuid]
    assert uuids[0] != uuids[1]
    name = _name("indep")
    dom = c0.defineXML(domain_xml(name, guest_image))
    try:
        assert name in c0.listDefinedDomains()
        assert name not in c1.listDefinedDomains()
        assert (h0.dir / "etc" / "qemu" / f"{name}.xml").exists()
        assert not (h1.dir / "etc" / "qemu" / f"{name}.xml").exists()
        assert not Path(f"/etc/libvirt/qemu/{name}.xml").exists()
    finally:
        dom.undefine()
    assert h0.migration_port_max < h1.migration_port_min


# ---- guest lifecycle and events -----------------------------------------------------------------


def test_guest_boots_and_acpi_shutdown(conns: tuple[libvirt.virConnect, libvirt.virConnect],
                                       rec0: LifecycleRecorder, lab_healthy: Lab,
                                       guest_image: GuestImage) -> None:
    g = Guest(lab_healthy.hosts[0], conns[0], guest_image, _name("acpi"))
    boot = g.wait_ready()
    assert boot < scaled(20), boot  # a hang, not a speed check: the bound stretches with the load
    assert rec0.for_domain(g.name)[:2] == [RESUMED_UNPAUSED, STARTED_BOOTED]
    assert len(lab_healthy.hosts[0].qemu_pids()) == 1
    g.dom.shutdown()
    evs = rec0.wait_for(g.name, STOPPED_SHUTDOWN, timeout=20)
    assert evs[2:] == [SHUTDOWN_GUEST, STOPPED_SHUTDOWN]
    assert "MOLDD-GUEST-ACPI-POWEROFF" in g.console()
    assert lab_healthy.hosts[0].qemu_pids() == []


def test_guest_powers_itself_off_with_halt_after(conns: tuple[libvirt.virConnect, libvirt.virConnect],
                                                 rec0: LifecycleRecorder, lab_healthy: Lab,
                                                 guest_image: GuestImage) -> None:
    g = Guest(lab_healthy.hosts[0], conns[0], guest_image, _name("halt"), cmdline_extra="halt_after=1")
    evs = rec0.wait_for(g.name, STOPPED_SHUTDOWN, timeout=30)
    assert evs == [RESUMED_UNPAUSED, STARTED_BOOTED, SHUTDOWN_GUEST, STOPPED_SHUTDOWN]
    assert "MOLDD-GUEST-HALTING" in g.console()


def test_qemu_killed_is_stopped_failed(conns: tuple[libvirt.virConnect, libvirt.virConnect],
                                       rec0: LifecycleRecorder, lab_healthy: Lab,
                                       guest_image: GuestImage) -> None:
    h0 = lab_healthy.hosts[0]
    g = Guest(h0, conns[0], guest_image, _name("kill9"))
    rec0.wait_for(g.name, STARTED_BOOTED, timeout=10)
    (pid,) = h0.qemu_pids()
    os.kill(pid, signal.SIGKILL)
    evs = rec0.wait_for(g.name, STOPPED_FAILED, timeout=10)
    assert evs == [RESUMED_UNPAUSED, STARTED_BOOTED, STOPPED_FAILED]


def test_destroy_is_stopped_destroyed(conns: tuple[libvirt.virConnect, libvirt.virConnect],
                                      rec0: LifecycleRecorder, lab_healthy: Lab,
                                      guest_image: GuestImage) -> None:
    g = Guest(lab_healthy.hosts[0], conns[0], guest_image, _name("destroy"))
    rec0.wait_for(g.name, STARTED_BOOTED, timeout=10)
    g.dom.destroy()
    evs = rec0.wait_for(g.name, STOPPED_DESTROYED, timeout=10)
    # libvirt 9.0 + QEMU 7.2: destroy sends SIGTERM; QEMU reports SHUTDOWN/HOST before STOPPED/DESTROYED
    # (libvirt-lab.md's table); accept its absence too, but nothing else.
    assert evs[2:] in ([SHUTDOWN_HOST, STOPPED_DESTROYED], [STOPPED_DESTROYED]), evs


# ---- migration ---------------------------------------------------------------------------------


def test_live_migration_between_hosts(conns: tuple[libvirt.virConnect, libvirt.virConnect],
                                      rec0: LifecycleRecorder, lab_healthy: Lab,
                                      guest_image: GuestImage) -> None:
    h0, h1 = lab_healthy.hosts
    c0, c1 = conns
    rec1 = LifecycleRecorder(c1)
    try:
        g = Guest(h0, c0, guest_image, _name("migr"))
        g.wait_ready()
        t0 = time.monotonic()
        # h1.migrate_uri() == "tcp://127.0.0.1": h1 picks a port in its own range.  Verified: also works with
        # an explicit port (h1.migrate_uri(h1.migration_port_min)), with uri=None (hostname resolves
        # locally) and with
        # migrateToURI3(h1.uri, {VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"}, LIVE | PEER2PEER)
        new = g.dom.migrate(c1, libvirt.VIR_MIGRATE_LIVE, None, h1.migrate_uri(), 0)
        took = time.monotonic() - t0
        assert took < 30
        assert new.name() == g.name and new.isActive()
        rec0.wait_for(g.name, STOPPED_MIGRATED, timeout=10)
        rec1.wait_for(g.name, RESUMED_MIGRATED, timeout=10)
        assert rec0.for_domain(g.name)[2:] == [SUSPENDED_MIGRATED, STOPPED_MIGRATED]
        assert rec1.for_domain(g.name) == [STARTED_MIGRATED, RESUMED_MIGRATED]
        assert h0.qemu_pids() == []
        assert len(h1.qemu_pids()) == 1
        # the migrated guest is alive: it still answers ACPI on the destination
        new.shutdown()
        evs = rec1.wait_for(g.name, STOPPED_SHUTDOWN, timeout=20)
        assert evs[2:] == [SHUTDOWN_GUEST, STOPPED_SHUTDOWN]
    finally:
        rec1.close()


# ---- host failures -----------------------------------------------------------------------------


def test_freeze_is_detected_by_keepalive_and_guests_keep_running(
    lab_healthy: Lab, guest_image: GuestImage, conns: tuple[libvirt.virConnect, libvirt.virConnect]
) -> None:
    h0 = lab_healthy.hosts[0]
    g = Guest(h0, conns[0], guest_image, _name("frz"))
    g.wait_ready()
    (qpid,) = h0.qemu_pids()
    conn = libvirt.open(h0.uri)
    closed = threading.Event()
    reasons: list[int] = []

    def on_close(c: libvirt.virConnect, reason: int, opaque: object) -> None:
        reasons.append(reason)
        closed.set()

    conn.registerCloseCallback(on_close, None)
    conn.setKeepAlive(2, 2)
    t0 = time.monotonic()
    h0.freeze()
    try:
        assert h0.is_frozen()
        assert closed.wait(20), "keepalive did not notice the frozen libvirtd"
        took = time.monotonic() - t0
        assert reasons == [libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE]
        assert 2 <= took <= 15, took
        assert os.path.exists(f"/proc/{qpid}")  # the guest keeps running while its host is frozen
    finally:
        h0.thaw()
    c = libvirt.open(h0.uri)
    try:
        assert c.lookupByName(g.name).isActive()
    finally:
        c.close()


def test_kill_leaves_no_qemu_and_restart_works(lab_healthy: Lab, guest_image: GuestImage) -> None:
    h1 = lab_healthy.hosts[1]
    c = libvirt.open(h1.uri)
    try:
        Guest(h1, c, guest_image, _name("pl1"))
        Guest(h1, c, guest_image, _name("pl2"))
    finally:
        c.close()
    assert len(h1.qemu_pids()) == 2
    old_pid = h1.pid
    h1.kill()
    assert not h1.is_running()
    assert h1.qemu_pids() == []
    assert host_processes(h1.dir) == {}
    assert old_pid is not None and not pid_alive(old_pid)
    h1.restart()
    assert h1.is_running() and h1.pid != old_pid
    c = libvirt.open(h1.uri)
    try:
        assert c.getHostname()
        assert c.listDomainsID() == []  # its transient guests died with the host
    finally:
        c.close()


def test_daemon_crash_and_restart_reconnects_to_running_guests(
    lab_healthy: Lab, guest_image: GuestImage, conns: tuple[libvirt.virConnect, libvirt.virConnect]
) -> None:
    h1 = lab_healthy.hosts[1]
    g = Guest(h1, conns[1], guest_image, _name("crash"))
    (qpid,) = h1.qemu_pids()
    h1.kill_daemon()
    assert not h1.is_running()
    assert h1.qemu_pids() == [qpid]  # orphaned (reparented) but still identified as host1's
    h1.restart()
    c = libvirt.open(h1.uri)
    try:
        assert c.lookupByName(g.name).isActive()
        assert h1.qemu_pids() == [qpid]
    finally:
        c.close()


def test_fence_kills_only_that_hosts_guests(lab_healthy: Lab, guest_image: GuestImage,
                                            conns: tuple[libvirt.virConnect, libvirt.virConnect]) -> None:
    h0, h1 = lab_healthy.hosts
    c0, c1 = conns
    rec1 = LifecycleRecorder(c1)
    try:
        a = Guest(h1, c1, guest_image, _name("fa"))
        b = Guest(h1, c1, guest_image, _name("fb"))
        other = Guest(h0, c0, guest_image, _name("fo"))
        assert h1.fence() == 2
        assert h1.qemu_pids() == []
        for g in (a, b):
            rec1.wait_for(g.name, STOPPED_FAILED, timeout=10)
        assert h1.is_running() and c1.getHostname()
        assert len(h0.qemu_pids()) == 1 and other.dom.isActive()
        # the standalone fencing command, as configured in moldd
        c = Guest(h0, c0, guest_image, _name("fc"))
        assert len(h0.qemu_pids()) == 2 and c.dom.isActive()
        res = subprocess.run([sys.executable, "-m", "moldlab.fence", "--host-dir", str(h0.dir)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        assert '"killed": 2' in res.stdout and '"survivors": []' in res.stdout
        assert h0.qemu_pids() == [] and h0.is_running()
        res = subprocess.run([sys.executable, "-m", "moldlab.fence", "--host-dir", str(h0.dir / "nope")],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2
    finally:
        rec1.close()


def test_fence_power_off_and_lab_stop_leave_nothing(tmp_path: Path, libvirt_events: None,
                                                    guest_image: GuestImage, lab: Lab) -> None:
    solo = Lab(tmp_path / "solo", n_hosts=1, name_prefix="solo", qemu_caps_cache=lab.qemu_caps_cache)
    with solo:
        (h,) = solo.hosts
        c = libvirt.open(h.uri)
        try:
            Guest(h, c, guest_image, _name("s1"))
        finally:
            c.close()
        assert len(h.qemu_pids()) == 1
        res = subprocess.run([sys.executable, "-m", "moldlab.fence", "--host-dir", str(h.dir),
                              "--power-off"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        assert host_processes(h.dir) == {}
        h.restart()
        c = libvirt.open(h.uri)
        try:
            Guest(h, c, guest_image, _name("s2"))
        finally:
            c.close()
        assert len(h.qemu_pids()) == 1
    assert host_processes(h.dir) == {}
    assert not h.is_running()
