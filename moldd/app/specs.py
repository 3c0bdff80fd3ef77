"""From a VM record and the configuration to the libvirt DomainSpec and disk paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moldd.app.secrets import SecretStore
from moldd.config import Config
from moldd.libvirt.xml import DomainSpec
from moldd.projection.model import VM


def vm_dir(config: Config, vm: str) -> Path:
    return config.storage_dir / vm


def root_disk_path(config: Config, vm: str, generation: int = 0) -> Path:
    suffix = "" if generation == 0 else f"-{generation}"
    return vm_dir(config, vm) / f"root{suffix}.qcow2"


def console_log_path(config: Config, vm: str) -> Path:
    return vm_dir(config, vm) / "console.log"


def domain_spec(config: Config, vm: VM) -> DomainSpec:
    """Everything the domain needs at its next start: offering, disks, ISO, advanced settings."""
    offering: dict[str, Any] = vm.offering
    details = vm.details
    template = config.template(vm.template) if vm.template else None
    iso = config.iso(vm.iso) if vm.iso else None
    kernel = template.kernel if template else None
    cmdline = template.cmdline if template else None
    if details.get("kernel_args") and kernel is not None:
        cmdline = f"{cmdline or ''} {details['kernel_args']}".strip()
    dynamic = bool(offering.get("dynamic"))
    boot_order = details.get("boot_order") or (
        ["cdrom", "hd"] if iso is not None and vm.template is None else ["hd"]
    )
    return DomainSpec(
        name=vm.internal_name,
        uuid=vm.uuid or None,
        vcpus=int(offering["vcpus"]),
        max_vcpus=int(offering.get("max_vcpus") or offering["vcpus"]) if dynamic else None,
        memory_mib=int(offering["memory_mib"]),
        max_memory_mib=int(offering.get("max_memory_mib") or offering["memory_mib"]) if dynamic else None,
        root_disk=Path(vm.root_disk["path"]) if vm.root_disk.get("path") else None,
        disk_bus=details.get("disk_bus", "virtio"),
        iso=iso.path if iso else None,
        cdrom_drive=True,
        boot_order=boot_order,
        boot_mode=details.get("boot_mode", "bios"),
        kernel=kernel,
        initrd=template.initrd if template else None,
        cmdline=cmdline,
        nic_model=details.get("nic_model"),
        cpu_model=details.get("cpu_model"),
        machine=details.get("machine"),
        serial_log=console_log_path(config, vm.name),
        vnc=True,
        vnc_password=SecretStore.for_config(config).reveal(details.get("vnc_password")),
        description=vm.display_name,
        moldd_vm=vm.name,
        domain_type=config.domain_type,
    )
