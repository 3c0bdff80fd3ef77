"""Fixtures for moldd.libvirt: a bridge, event recorders, HostConnections to the lab hosts, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.host import HostConnection
from moldd.testing.recorder import Recorder


@pytest.fixture(autouse=True, scope="session")
def _one_libvirt_event_loop(libvirt_events: None) -> None:
    """The lab's fixture registers libvirt's event loop first; the bridge adopts that thread."""


@pytest.fixture
async def bridge() -> AsyncIterator[LibvirtBridge]:
    b = LibvirtBridge()
    b.start()
    yield b
    b.shutdown()


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder(loop_thread=threading.current_thread())


def make_conn(name: str, uri: str, bridge: LibvirtBridge, rec: Recorder, **kw: Any) -> HostConnection:
    return rec.connection(name, uri, bridge, **kw)


def _wipe_host(uri: str) -> None:
    """Destroy and undefine every domain (sync: runs in a thread from the fixture)."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                for snap in dom.listAllSnapshots(0):
                    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
    finally:
        conn.close()


def _reap_orphaned_libvirtd_helpers() -> None:
    """Work around moldd.lab.reaper: it only ever looks at the *first* exited child (``waitid`` with
    ``WNOWAIT``) and skips non-QEMU ones, so one orphaned libvirtd helper (comm ``rpc-libvirtd``, left
    when a test kills libvirtd) wedges it and every later QEMU stays a zombie: libvirt then needs 80 s
    to destroy a domain ("Failed to terminate process ... with SIGKILL").  Reap those orphans here."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == me and comm.startswith("rpc-"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def _heal_lab(lab: Any) -> None:
    _reap_orphaned_libvirtd_helpers()
    for h in lab.hosts:
        if h.is_frozen():
            h.thaw()
        if not h.is_running():
            h.restart()
        _wipe_host(h.uri)


@pytest.fixture
async def lab_conns(
    lab_healthy: Any, bridge: LibvirtBridge, recorder: Recorder
) -> AsyncIterator[tuple[HostConnection, HostConnection]]:
    """HostConnections to the two lab hosts (started); afterwards hosts healed and emptied."""
    await asyncio.wait_for(asyncio.to_thread(_heal_lab, lab_healthy), 60)
    h0, h1 = lab_healthy.hosts
    c0 = make_conn(h0.name, h0.uri, bridge, recorder)
    c1 = make_conn(h1.name, h1.uri, bridge, recorder)
    assert await c0.async_start()
    assert await c1.async_start()
    try:
        yield c0, c1
    finally:
        await c0.async_stop()
        await c1.async_stop()
        await asyncio.wait_for(asyncio.to_thread(_heal_lab, lab_healthy), 60)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    """A directory every lab host sees (outside their private dirs)."""
    d = tmp_path / "disks"
    d.mkdir()
    return d
