"""Event names come from libvirt's constants; payloads are JSON-ready."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import libvirt

from moldd.libvirt.events import DomainEvent, HostLinkEvent, detail_name, event_name, state_name


def test_names_match_libvirt_constants() -> None:
    assert event_name(libvirt.VIR_DOMAIN_EVENT_STOPPED) == "STOPPED"
    assert detail_name(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED) == "FAILED"
    assert (
        detail_name(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED) == "MIGRATED"
    )
    assert detail_name(libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST) == "GUEST"
    assert detail_name(libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST) == "HOST"
    assert (
        detail_name(libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED)
        == "FINISHED"
    )
    assert (
        detail_name(libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED) == "PAUSED"
    )
    assert (
        detail_name(libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED_DISK) == "DISK"
    )
    assert state_name(libvirt.VIR_DOMAIN_SHUTOFF) == "shutoff"
    assert state_name(libvirt.VIR_DOMAIN_PMSUSPENDED) == "pmsuspended"


def test_unknown_codes_do_not_fail() -> None:
    assert event_name(99) == "UNKNOWN_99"
    assert detail_name(libvirt.VIR_DOMAIN_EVENT_STOPPED, 77) == "UNKNOWN_77"


def test_payloads_are_json_ready() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ev = DomainEvent.from_codes("h1", "vm1", "u-1", 5, 5, at)
    assert json.loads(json.dumps(ev.to_payload())) == {
        "host": "h1",
        "domain": "vm1",
        "uuid": "u-1",
        "event": "STOPPED",
        "detail": "FAILED",
        "event_code": 5,
        "detail_code": 5,
        "at": "2026-01-02T03:04:05+00:00",
    }
    link = HostLinkEvent("h1", "disconnected", "keepalive", at)
    assert json.loads(json.dumps(link.to_payload()))["reason"] == "keepalive"
