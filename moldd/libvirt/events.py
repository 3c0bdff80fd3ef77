"""What a libvirt host tells us: domain lifecycle events and the state of our link to the host.

Names come from libvirt's own constants (``VIR_DOMAIN_EVENT_STOPPED`` → ``"STOPPED"``,
``VIR_DOMAIN_EVENT_STOPPED_FAILED`` → ``"FAILED"``), so they match libvirt's documentation.  Unknown codes
(a newer libvirtd than our bindings) become ``"UNKNOWN_<n>"`` rather than an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import libvirt

_EVENT_NAMES = (
    "DEFINED",
    "UNDEFINED",
    "STARTED",
    "SUSPENDED",
    "RESUMED",
    "STOPPED",
    "SHUTDOWN",
    "PMSUSPENDED",
    "CRASHED",
)


def _event_tables() -> tuple[dict[int, str], dict[int, dict[int, str]]]:
    events: dict[int, str] = {}
    details: dict[int, dict[int, str]] = {}
    for name in _EVENT_NAMES:
        code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{name}", None)
        if code is None:
            continue
        events[code] = name
        prefix = f"VIR_DOMAIN_EVENT_{name}_"
        details[code] = {
            getattr(libvirt, attr): attr[len(prefix) :]
            for attr in dir(libvirt)
            if attr.startswith(prefix) and not attr.endswith("_LAST")
        }
    return events, details


EVENT_NAMES, DETAIL_NAMES = _event_tables()

STATE_NAMES: dict[int, str] = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def event_name(code: int) -> str:
    return EVENT_NAMES.get(code, f"UNKNOWN_{code}")


def detail_name(event_code: int, detail_code: int) -> str:
    return DETAIL_NAMES.get(event_code, {}).get(detail_code, f"UNKNOWN_{detail_code}")


def state_name(code: int) -> str:
    return STATE_NAMES.get(code, "nostate")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DomainEvent:
    """One libvirt lifecycle event of one domain on one host."""

    host: str
    domain: str
    uuid: str
    event: str
    detail: str
    event_code: int
    detail_code: int
    at: datetime

    @classmethod
    def from_codes(
        cls, host: str, domain: str, uuid: str, event_code: int, detail_code: int, at: datetime | None = None
    ) -> DomainEvent:
        return cls(
            host=host,
            domain=domain,
            uuid=uuid,
            event=event_name(event_code),
            detail=detail_name(event_code, detail_code),
            event_code=event_code,
            detail_code=detail_code,
            at=at or _now(),
        )

    @classmethod
    def rebooted(cls, host: str, domain: str, uuid: str) -> DomainEvent:
        """libvirt's REBOOT event (a separate event id, not a lifecycle code): the guest was reset."""
        return cls(host=host, domain=domain, uuid=uuid, event="REBOOTED", detail="RESET",
                   event_code=-1, detail_code=-1, at=_now())  # fmt: skip

    def to_payload(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "domain": self.domain,
            "uuid": self.uuid,
            "event": self.event,
            "detail": self.detail,
            "event_code": self.event_code,
            "detail_code": self.detail_code,
            "at": self.at.isoformat(),
        }


LinkKind = Literal["connected", "disconnected", "reconnect_failed"]

CLOSE_REASONS: dict[int, str] = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


@dataclass(frozen=True)
class HostLinkEvent:
    """Our connection to a host came up, went down, or another reconnect attempt failed."""

    host: str
    kind: LinkKind
    reason: str
    at: datetime

    @classmethod
    def now(cls, host: str, kind: LinkKind, reason: str) -> HostLinkEvent:
        return cls(host=host, kind=kind, reason=reason, at=_now())

    def to_payload(self) -> dict[str, Any]:
        return {"host": self.host, "kind": self.kind, "reason": self.reason, "at": self.at.isoformat()}
