"""Test helper: collect what HostConnections report and wait for it (``moldd.libvirt`` tests, lab demos)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.events import DomainEvent, HostLinkEvent
from moldd.libvirt.host import HostConnection
from moldlab.testing.load import scaled


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

    def connection(self, name: str, uri: str, bridge: LibvirtBridge, **kw: Any) -> HostConnection:
        """A HostConnection whose callbacks feed this recorder."""
        return HostConnection(name, uri, bridge, self.on_domain_event, self.on_link_event, **kw)

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
            timeout = scaled(timeout)  # a limit for a hang, stretched on a busy machine
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

    async def wait_domain(
        self, domain: str, pair: tuple[str, str], host: str | None = None, timeout: float = 30.0
    ) -> list[tuple[str, str]]:
        await self.wait(lambda: pair in self.pairs(domain, host), timeout, f"{domain} {pair}")
        return self.pairs(domain, host)

    async def wait_link(self, host: str, kind: str, after: int = 0, timeout: float = 30.0) -> HostLinkEvent:
        def found() -> bool:
            return any(e.kind == kind for e in self.link_events[after:] if e.host == host)

        await self.wait(found, timeout, f"{host} {kind}")
        return next(e for e in self.link_events[after:] if e.host == host and e.kind == kind)
