"""libvirt event plumbing for lab tests and benchmarks (threads, no asyncio).

* :func:`ensure_default_event_loop` registers libvirt's default event implementation once per process
  (``virEventRegisterDefaultImpl``; must happen **before** opening the connections that want events or
  keepalive) and runs ``virEventRunDefaultImpl`` in one daemon thread.  Idempotent.
  Do not combine with ``libvirtaio`` in the same process: there is only one event implementation.
* :class:`LifecycleRecorder` records ``(domain name, event, detail)`` of one connection and lets a test
  wait for a sequence of them.

Lifecycle event numbers, verified against ``libvirt.VIR_DOMAIN_EVENT_*`` (libvirt-python 9.0) and
observed on real QEMU guests here (tests/lab/test_lab.py):

=======================================  ===============================================================
what happened                            events (event/detail)
=======================================  ===============================================================
create (start)                           RESUMED(4)/UNPAUSED(0), STARTED(2)/BOOTED(0)
ACPI ``shutdown()``                      SHUTDOWN(6)/GUEST(1), STOPPED(5)/SHUTDOWN(0)
poweroff inside the guest (halt_after)   SHUTDOWN(6)/GUEST(1), STOPPED(5)/SHUTDOWN(0) (identical)
qemu SIGKILLed / fenced                  STOPPED(5)/FAILED(5) only
``destroy()``                            SHUTDOWN(6)/HOST(2), STOPPED(5)/DESTROYED(1)
live migration, source                   SUSPENDED(3)/MIGRATED(1), then STOPPED(5)/MIGRATED(3)
live migration, target                   STARTED(2)/MIGRATED(1), then RESUMED(4)/MIGRATED(1)
=======================================  ===============================================================

Connection close reasons: ``VIR_CONNECT_CLOSE_REASON_EOF`` = 1, ``..._KEEPALIVE`` = 2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_default_event_loop() -> None:
    """Register libvirt's default event loop (once per process) and run it in a daemon thread: the same thread
    moldd's bridge uses, since libvirt allows one event implementation per process."""
    from moldd.libvirt.bridge import ensure_event_loop_thread

    ensure_event_loop_thread()


EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "DEFINED",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "UNDEFINED",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "SUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "RESUMED",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "PMSUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "CRASHED",
}


@dataclass(frozen=True)
class LifecycleEvent:
    domain: str
    event: int
    detail: int
    at: float  # time.monotonic()

    @property
    def pair(self) -> tuple[int, int]:
        return (self.event, self.detail)

    def __str__(self) -> str:
        return f"{self.domain}:{EVENT_NAMES.get(self.event, self.event)}/{self.detail}"


class LifecycleRecorder:
    """Records the lifecycle events of one connection (the event loop must be running)."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.events: list[LifecycleEvent] = []
        self._cond = threading.Condition()
        self._cb_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int,
                  opaque: Any) -> None:
        with self._cond:
            self.events.append(LifecycleEvent(dom.name(), event, detail, time.monotonic()))
            self._cond.notify_all()

    def for_domain(self, name: str) -> list[tuple[int, int]]:
        with self._cond:
            return [e.pair for e in self.events if e.domain == name]

    def wait_until(self, pred: Callable[[list[LifecycleEvent]], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_for(self, name: str, pair: tuple[int, int], timeout: float = 30.0) -> list[tuple[int, int]]:
        """Wait until ``name`` got the event ``pair``; returns that domain's events so far.

        Raises ``TimeoutError`` listing what was received."""
        ok = self.wait_until(lambda evs: any(e.domain == name and e.pair == pair for e in evs), timeout)
        if not ok:
            raise TimeoutError(f"no event {pair} for {name} within {timeout}s; got {self.for_domain(name)}")
        return self.for_domain(name)

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self._cb_id)
        except libvirt.libvirtError:
            pass
