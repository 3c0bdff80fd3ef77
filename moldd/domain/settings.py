"""Advanced settings (per-VM "details"): a closed set of knobs, each validated, applied at the next start."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from moldd.domain.errors import ValidationError


def _choice(*options: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value not in options:
            raise ValidationError(
                f"details.{key} must be one of {', '.join(options)}, got {value!r}", field=f"details.{key}"
            )
        return value

    return check


def _boot_order(key: str, value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValidationError(f"details.{key} must be a list such as ['cdrom', 'hd']", field=f"details.{key}")
    out = []
    for item in items:
        dev = str(item).strip()
        if dev not in ("hd", "cdrom", "network"):
            raise ValidationError(
                f"details.{key}: unknown boot device {item!r} (hd, cdrom, network)", field=f"details.{key}"
            )
        if dev in out:
            raise ValidationError(f"details.{key}: {dev} listed twice", field=f"details.{key}")
        out.append(dev)
    return out


def _vnc_password(key: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 8 or not value.isprintable():
        raise ValidationError(
            f"details.{key} must be 1-8 printable characters (a VNC limit)", field=f"details.{key}"
        )
    return value


def _cpu_model(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", value):
        raise ValidationError(
            f"details.{key} must be a CPU model name such as qemu64", field=f"details.{key}"
        )
    if value in ("host-model", "host-passthrough"):
        raise ValidationError(
            f"details.{key} {value!r} needs KVM; this cluster runs TCG", field=f"details.{key}"
        )
    return value


def _kernel_args(key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 512 or not value.isprintable():
        raise ValidationError(
            f"details.{key} must be printable text of at most 512 characters", field=f"details.{key}"
        )
    return value


SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "boot_order": _boot_order,
    "boot_mode": _choice("bios", "uefi"),
    "disk_bus": _choice("virtio", "sata", "ide"),
    "nic_model": _choice("virtio", "e1000", "rtl8139"),
    "cpu_model": _cpu_model,
    "machine": _choice("pc", "q35"),
    "vnc_password": _vnc_password,
    "kernel_args": _kernel_args,
}


def check_combination(details: Mapping[str, Any], *, kernel_boot: bool, template: str | None) -> None:
    """The rules between a VM's settings, and between its settings and how it boots. Raises naming the setting;
    a setting that would have no effect on this VM is refused rather than silently ignored."""
    machine = str(details.get("machine") or "")
    q35 = machine == "q35" or machine.startswith("pc-q35")
    if q35 and details.get("disk_bus") == "ide":
        raise ValidationError(
            "details.disk_bus 'ide' cannot be used with machine 'q35' (it has no IDE controller): use sata or virtio",
            field="details.disk_bus",
        )
    if kernel_boot and details.get("boot_order"):
        raise ValidationError(
            f"details.boot_order has no effect: template {template!r} boots a kernel directly, not from a device",
            field="details.boot_order",
        )
    if not kernel_boot and details.get("kernel_args"):
        raise ValidationError(
            "details.kernel_args has no effect: this VM boots from its disk or ISO, not a kernel given by the "
            "template",
            field="details.kernel_args",
        )
    if kernel_boot and details.get("boot_mode") == "uefi":
        raise ValidationError(
            f"details.boot_mode 'uefi' has no effect: template {template!r} boots a kernel directly",
            field="details.boot_mode",
        )


def validate_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Validated copy; a value of None removes the setting (returned as None so the caller can drop it)."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        check = SETTINGS.get(key)
        if check is None:
            raise ValidationError(
                f"unknown setting details.{key} (allowed: {', '.join(sorted(SETTINGS))})",
                field=f"details.{key}",
            )
        out[key] = None if value is None else check(key, value)
    return out
