"""Rules for changing a VM's size: hot scale-up of a running VM, and resizing its root disk. Pure: the caller
supplies the offerings, the maxima the running domain was started with, and the sizes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moldd.domain.errors import InvalidState, ValidationError


@dataclass(frozen=True)
class ScalePlan:
    vcpus: int | None  # new vCPU count, or None when unchanged
    memory_mib: int | None  # new memory, or None when unchanged


def check_scale(
    current: Mapping[str, Any], new: Mapping[str, Any], *, max_vcpus: int, max_memory_mib: int
) -> ScalePlan:
    """May a running VM move from offering ``current`` to ``new`` without a restart?

    CloudStack's rule: both offerings dynamically scalable, nothing decreases, and the new values fit in the
    maxima fixed when the domain started (``max_vcpus``/``max_memory_mib``)."""
    cur_name, new_name = current.get("name"), new.get("name")
    if cur_name == new_name:
        raise ValidationError(f"the VM already uses offering {new_name!r}", field="offering")
    if not current.get("dynamic"):
        raise ValidationError(
            f"the VM's offering {cur_name!r} is not dynamically scalable: stop the VM and use "
            "changeServiceForVirtualMachine",
            field="offering",
        )
    if not new.get("dynamic"):
        raise ValidationError(
            f"offering {new_name!r} is not dynamically scalable: stop the VM and use changeServiceForVirtualMachine",
            field="offering",
        )
    vcpus, mem = int(new["vcpus"]), int(new["memory_mib"])
    cur_vcpus, cur_mem = int(current["vcpus"]), int(current["memory_mib"])
    if vcpus < cur_vcpus or mem < cur_mem:
        raise ValidationError(
            f"hot scaling only goes up: {new_name!r} has {vcpus} vCPU / {mem} MiB, the VM runs with "
            f"{cur_vcpus} vCPU / {cur_mem} MiB (to scale down, stop the VM and change its offering)",
            field="offering",
        )
    if vcpus > max_vcpus:
        raise ValidationError(
            f"{new_name!r} needs {vcpus} vCPUs but the running VM was started with a maximum of {max_vcpus}: "
            "stop it and change the offering",
            field="offering",
        )
    if mem > max_memory_mib:
        raise ValidationError(
            f"{new_name!r} needs {mem} MiB but the running VM was started with a maximum of {max_memory_mib} MiB: "
            "stop it and change the offering",
            field="offering",
        )
    return ScalePlan(vcpus=vcpus if vcpus != cur_vcpus else None, memory_mib=mem if mem != cur_mem else None)


def check_resize(current_gb: float, new_gb: int, *, shrink_ok: bool, snapshots: int) -> bool:
    """Check a root-disk resize to ``new_gb`` GiB; returns True for a shrink, False for a grow.

    The state rule (shrink only while Stopped) is checked by the caller with ``states.check``."""
    if snapshots:
        raise InvalidState(
            f"the VM has {snapshots} VM snapshot(s): qcow2 cannot resize a disk with internal snapshots; "
            "delete them first",
            field="id",
        )
    if abs(new_gb - current_gb) < 0.0005:
        raise ValidationError(f"the root disk is already {new_gb} GiB", field="size")
    shrink = new_gb < current_gb
    if shrink and not shrink_ok:
        raise ValidationError(
            f"{new_gb} GiB is smaller than the current {current_gb:g} GiB: shrinking loses data, "
            "pass shrinkok=true (and stop the VM) to do it anyway",
            field="shrinkok",
        )
    return shrink
