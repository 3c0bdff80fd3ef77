"""Fixtures for moldd.libvirt: a bridge, event recorders, HostConnections to the lab hosts, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.events import DomainEvent, HostLinkEvent
from moldd.libvirt.host import HostConnection


@pytest.fixture(autouse=True, scope="session")
def _one_libvirt_event_loop(libvirt_events: None) -> None:
    """The lab's fixture registers libvirt's event loop first; the bridge adopts that thread."""


@dataclass
class Recorder:
    """Collects what HostConnections report, and whether each callback ran on the loop thread."""

    loop_thread: threading.Thread
    domain_events: list[DomainEvent] = field(default_factory=list)
    link_events: list[HostLinkEvent] = field(default_factory=list)
    off_loop_calls: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_domain_event(self, ev: DomainEvent) -> None:
        self._check_thread()
        self.domain_events.append(ev)
        self._changed.set()

    def on_link_event(self, ev: HostLinkEvent) -> None:
        self._check_thread()
        self.link_events.append(ev)
        self._changed.set()

    def _check_thread(self) -> None:
        if threading.current_thread() is not self.loop_thread:
            self.off_loop_calls += 1

    def pairs(self, domain: str, host: str | None = None) -> list[tuple[str, str]]:
        return [
            (e.event, e.detail)
            for e in self.domain_events
            if e.domain == domain and (host is None or e.host == host)
        ]

    def links(self, host: str) -> list[tuple[str, str]]:
        return [(e.kind, e.reason) for e in self.link_events if e.host == host]

    async def wait(self, pred: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not pred():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; domain events: "
                f"{[(e.host, e.domain, e.event, e.detail) for e in self.domain_events]}; "
                f"link events: {[(e.host, e.kind, e.reason) for e in self.link_events]}"
            ) from None

    async def wait_domain(self, domain: str, pair: tuple[str, str], host: str | None = None,
                          timeout: float = 30.0) -> list[tuple[str, str]]:
        await self.wait(lambda: pair in self.pairs(domain, host), timeout, f"{domain} {pair}")
        return self.pairs(domain, host)

    async def wait_link(self, host: str, kind: str, after: int = 0, timeout: float = 30.0) -> HostLinkEvent:
        def found() -> bool:
            return any(e.kind == kind for e in self.link_events[after:] if e.host == host)

        await self.wait(found, timeout, f"{host} {kind}")
        return next(e for e in self.link_events[after:] if e.host == host and e.kind == kind)


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
    return HostConnection(name, uri, bridge, rec.on_domain_event, rec.on_link_event, **kw)


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


def _heal_lab(lab: Any) -> None:
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
    await asyncio.to_thread(_heal_lab, lab_healthy)
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
        await asyncio.to_thread(_heal_lab, lab_healthy)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    """A directory every lab host sees (outside their private dirs)."""
    d = tmp_path / "disks"
    d.mkdir()
    return d


@pytest.fixture
def no_leaks() -> Iterator[None]:
    yield
