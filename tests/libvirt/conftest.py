"""Fixtures for moldd.libvirt: a bridge, event recorders, HostConnections to the lab hosts, clean-up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.host import HostConnection
from moldlab.testing.recorder import Recorder


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


def _heal_lab(lab: Any) -> None:
    lab.heal(wipe=True)


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
