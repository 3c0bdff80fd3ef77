"""A VM's advanced settings checked as a whole when they are set, not when the VM next starts: against each other
and how the VM boots (``moldd.domain.settings.check_combination``), and against what the hosts the VM may run on
support (libvirt's capabilities and domain capabilities: machine types, CPU models, disk buses, UEFI firmware)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from moldd.domain.errors import MolddError, ValidationError
from moldd.domain.settings import check_combination

log = structlog.get_logger("moldd.app")

CAPS_TTL_S = 600.0
_CAPS: dict[tuple[str, str, str, str | None], tuple[float, Any]] = {}
HOST_SETTINGS = ("machine", "cpu_model", "disk_bus", "boot_mode")


async def _async_caps(app: Any, host: str, machine: str | None) -> Any:
    """The host's DomainCaps (cached), or None when its driver cannot say."""
    conn = app.hosts.conn(host)
    key = (host, conn.uri, app.config.domain_type, machine)
    hit = _CAPS.get(key)
    if hit is not None and time.monotonic() - hit[0] < CAPS_TTL_S:
        return hit[1]
    try:
        caps = await conn.async_domain_caps(app.config.domain_type, machine)
    except MolddError as exc:
        if "not supported" not in exc.message:
            raise
        caps = None  # e.g. libvirt's test driver
    _CAPS[key] = (time.monotonic(), caps)
    return caps


def _some(values: Any, n: int = 12) -> str:
    items = sorted(values)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


async def async_check_settings(
    app: Any, details: Mapping[str, Any], *, template: str | None, cluster: str | None
) -> list[str]:
    """Refuse (``ValidationError`` naming ``details.<key>``) a settings set that cannot work; returns warnings
    (e.g. that no host could be asked)."""
    t = app.config.template(template) if template else None
    check_combination(details, kernel_boot=bool(t is not None and t.kernel is not None), template=template)
    if not any(details.get(k) for k in HOST_SETTINGS):
        return []
    machine = details.get("machine")
    checked: list[str] = []
    for h in app.config.hosts:
        if cluster is not None and h.cluster != cluster:
            continue
        if not app.hosts.is_connected(h.name):
            continue
        try:
            caps = await _async_caps(app, h.name, machine)
        except MolddError as exc:
            log.info("settings_caps_unavailable", host=h.name, reason=exc.message)
            continue
        if caps is None:
            continue
        checked.append(h.name)
        if machine and machine not in caps.machines:
            raise ValidationError(
                f"details.machine {machine!r} is not offered by host {h.name} (it has: {_some(caps.machines)})",
                field="details.machine",
            )
        cpu = details.get("cpu_model")
        if cpu:
            usable = caps.cpu_models.get(cpu)
            if usable is None:
                raise ValidationError(
                    f"details.cpu_model {cpu!r} is not a CPU model host {h.name} knows "
                    f"(e.g. {_some(m for m, ok in caps.cpu_models.items() if ok)})",
                    field="details.cpu_model",
                )
            if not usable:
                raise ValidationError(
                    f"details.cpu_model {cpu!r} is not usable on host {h.name} with {app.config.domain_type}",
                    field="details.cpu_model",
                )
        bus = details.get("disk_bus")
        if bus and caps.disk_buses and bus not in caps.disk_buses:
            raise ValidationError(
                f"details.disk_bus {bus!r} is not available on host {h.name} for machine {machine or 'default'}"
                f" (it has: {_some(caps.disk_buses)})",
                field="details.disk_bus",
            )
        if details.get("boot_mode") == "uefi" and "efi" not in caps.firmware:
            raise ValidationError(
                f"details.boot_mode 'uefi': host {h.name} has no UEFI firmware installed (e.g. the ovmf package)",
                field="details.boot_mode",
            )
    if not checked:
        return [
            "the settings were not checked against host capabilities: no host"
            + (f" of cluster {cluster}" if cluster else "")
            + " could be asked"
        ]
    return []
