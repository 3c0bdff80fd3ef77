"""Domain XML from DomainSpec: parsed back, hostile strings escaped, bad specs refused with the field."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from moldd.domain.errors import ValidationError
from moldd.libvirt.xml import MOLDD_XMLNS, DomainSpec, build_domain_xml, moldd_vm_name


def _parse(spec: DomainSpec) -> ET.Element:
    return ET.fromstring(build_domain_xml(spec))


def test_minimal_spec_is_a_tcg_domain_without_nic_with_acpi_and_destroy_on_poweroff() -> None:
    root = _parse(DomainSpec(name="vm1"))
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "vm1"
    assert root.find("features/acpi") is not None
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_crash") == "destroy"
    assert root.find("devices/interface") is None
    assert root.find("cpu") is None
    assert root.find("devices/graphics").get("listen") == "127.0.0.1"  # type: ignore[union-attr]
    assert root.find("devices/graphics").get("autoport") == "yes"  # type: ignore[union-attr]
    assert root.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


def test_memory_max_and_current_and_vcpu_max_and_current() -> None:
    root = _parse(DomainSpec(name="vm", vcpus=2, max_vcpus=4, memory_mib=128, max_memory_mib=512))
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("currentMemory") == "128"
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.text == "4" and vcpu.get("current") == "2"
    assert root.find("devices/memballoon").get("model") == "virtio"  # type: ignore[union-attr]


def test_disks_iso_boot_order_and_buses(tmp_path: Path) -> None:
    spec = DomainSpec(
        name="vm",
        root_disk=tmp_path / "root.qcow2",
        disk_bus="sata",
        iso=tmp_path / "i.iso",
        boot_order=["cdrom", "hd"],
        disk_cache="none",
    )
    root = _parse(spec)
    disks = root.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk", "cdrom"]
    assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks[0].find("driver").get("cache") == "none"  # type: ignore[union-attr]
    assert disks[0].find("target").attrib == {"dev": "sda", "bus": "sata"}  # type: ignore[union-attr]
    assert disks[1].find("source").get("file") == str(tmp_path / "i.iso")  # type: ignore[union-attr]
    assert disks[1].find("readonly") is not None
    assert [b.get("dev") for b in root.findall("os/boot")] == ["cdrom", "hd"]


def test_empty_cdrom_drive_for_later_media_change() -> None:
    root = _parse(DomainSpec(name="vm", cdrom_drive=True))
    (cd,) = root.findall("devices/disk")
    assert cd.get("device") == "cdrom" and cd.find("source") is None
    assert cd.find("target").attrib == {"dev": "hdc", "bus": "ide"}  # type: ignore[union-attr]


def test_direct_kernel_boot_and_serial_log(tmp_path: Path) -> None:
    spec = DomainSpec(
        name="vm",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        cmdline="console=ttyS0 halt_after=3",
        serial_log=tmp_path / "serial.log",
    )
    root = _parse(spec)
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert root.findtext("os/initrd") == str(tmp_path / "initrd")
    assert root.findtext("os/cmdline") == "console=ttyS0 halt_after=3"
    assert root.find("os/boot") is None
    assert root.find("devices/serial/log").get("file") == str(tmp_path / "serial.log")  # type: ignore[union-attr]


def test_hostile_strings_are_escaped_not_interpreted() -> None:
    evil = "x'/><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><a b=\"&amp;"
    spec = DomainSpec(name="vm", description=evil, vnc_password="p'\"<&>", moldd_vm=evil, cmdline=None)
    xml = build_domain_xml(spec)
    root = ET.fromstring(xml)
    assert root.findtext("description") == evil
    assert root.find("devices/graphics").get("passwd") == "p'\"<&>"  # type: ignore[union-attr]
    assert moldd_vm_name(xml) == evil
    assert root.find(f"metadata/{{{MOLDD_XMLNS}}}vm") is not None
    assert "/etc/shadow" not in [d.findtext("source") for d in root.iter("disk")]
    assert len(root.findall("devices/disk")) == 0


def test_nic_only_when_configured() -> None:
    root = _parse(DomainSpec(name="vm", nic_model="virtio", nic_type="network", nic_source="default"))
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "network"
    assert nic.find("source").get("network") == "default"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]


def test_cpu_model_custom() -> None:
    root = _parse(DomainSpec(name="vm", cpu_model="qemu64"))
    assert root.find("cpu").get("mode") == "custom"  # type: ignore[union-attr]
    assert root.findtext("cpu/model") == "qemu64"


def test_uefi_uses_ovmf_when_installed(tmp_path: Path) -> None:
    code = tmp_path / "OVMF_CODE.fd"
    code.write_bytes(b"")
    root = _parse(DomainSpec(name="vm", boot_mode="uefi", ovmf_code=code))
    assert root.findtext("os/loader") == str(code)
    assert root.find("os/loader").get("type") == "pflash"  # type: ignore[union-attr]
    assert root.find("os/nvram") is not None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "bad name"}, "name"),
        ({"name": "../etc"}, "name"),
        ({"name": "vm", "uuid": "nope"}, "uuid"),
        ({"name": "vm", "vcpus": 0}, "vcpus"),
        ({"name": "vm", "vcpus": 4, "max_vcpus": 2}, "max_vcpus"),
        ({"name": "vm", "memory_mib": 256, "max_memory_mib": 128}, "max_memory_mib"),
        ({"name": "vm", "disk_bus": "scsi"}, "disk_bus"),
        ({"name": "vm", "boot_order": ["floppy"]}, "boot_order"),
        ({"name": "vm", "boot_mode": "uefi", "ovmf_code": Path("/nonexistent/OVMF.fd")}, "boot_mode"),
        ({"name": "vm", "cpu_model": "host-model"}, "cpu_model"),
        ({"name": "vm", "cmdline": "console=ttyS0"}, "kernel"),
        ({"name": "vm", "description": "a\x00b"}, "description"),
        ({"name": "vm", "description": "a\ud800b"}, "description"),  # a lone surrogate is not UTF-8
        ({"name": "vm", "moldd_vm": "x\uffff"}, "moldd_vm"),
        ({"name": "vm", "nic_model": "virtio", "nic_type": "bridge"}, "nic_source"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as ei:
        build_domain_xml(DomainSpec(**kwargs))  # type: ignore[arg-type]
    assert ei.value.field == field
