"""Domain XML from a typed spec, built with ElementTree so user input is always escaped.

Defaults fit the lab (and hosts without KVM): ``<domain type='qemu'>`` (TCG), no NIC, no CPU model
(QEMU's default ``qemu64``; ``host-model`` needs KVM), serial console on a pty *and* copied to a log file,
VNC on 127.0.0.1 with an automatic port.

Memory: ``<memory>`` is the maximum (``max_memory_mib``) and ``<currentMemory>`` the balloon target
(``memory_mib``); a virtio balloon lets :meth:`HostConnection.async_set_memory` move the target live up to
the maximum.  DIMM hot-plug (``<maxMemory slots=...>``) needs a NUMA topology and guest support and is not
used.  vCPUs: ``<vcpu current='vcpus'>max_vcpus</vcpu>`` so vCPUs can be hot-plugged up to the maximum.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moldd.domain.errors import ValidationError

MOLDD_XMLNS = "https://moldd.dev/xmlns/domain/1"
MOLDD_PREFIX = "moldd"

DiskBus = Literal["virtio", "sata", "ide"]
BootDev = Literal["hd", "cdrom", "network"]
BootMode = Literal["bios", "uefi"]
NicType = Literal["user", "network", "bridge"]

DEFAULT_OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
DEFAULT_OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
# XML 1.0 cannot carry these at all, escaped or not; lone surrogates cannot even be encoded as UTF-8.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_TARGET_PREFIX: dict[str, str] = {"virtio": "vd", "sata": "sd", "ide": "hd"}


@dataclass
class DomainSpec:
    """Everything moldd decides about a domain; :func:`build_domain_xml` renders it."""

    name: str
    uuid: str | None = None
    vcpus: int = 1
    max_vcpus: int | None = None
    memory_mib: int = 64
    max_memory_mib: int | None = None
    root_disk: Path | None = None
    disk_bus: DiskBus = "virtio"
    disk_cache: str | None = None  # e.g. "none"; None leaves QEMU's default
    iso: Path | None = None
    cdrom_drive: bool = False  # an (empty) cdrom drive even without an ISO, so media can be inserted later
    boot_order: list[BootDev] = field(default_factory=lambda: ["hd"])
    boot_mode: BootMode = "bios"
    ovmf_code: Path = DEFAULT_OVMF_CODE
    ovmf_vars_template: Path = DEFAULT_OVMF_VARS
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    nic_model: str | None = None  # None: no NIC (the lab has no bridge)
    nic_type: NicType = "user"
    nic_source: str | None = None  # network name or bridge name
    cpu_model: str | None = None  # None: QEMU default (qemu64 on TCG)
    serial_log: Path | None = None
    vnc: bool = True
    vnc_password: str | None = None
    description: str = ""
    moldd_vm: str | None = None  # moldd's VM name, stored in <metadata>
    domain_type: str = "qemu"
    machine: str | None = None  # e.g. "pc"; None lets libvirt choose the default
    extra: dict[str, str] = field(default_factory=dict)  # more moldd metadata key/values

    def validate(self) -> None:
        """Raise :class:`ValidationError` naming the field at fault."""
        if not _NAME_RE.match(self.name):
            raise ValidationError(
                "domain name must be 1-64 characters of letters, digits, '_', '.', '+', '-' "
                "and start with a letter or digit",
                field="name",
            )
        if self.uuid is not None:
            try:
                uuidlib.UUID(self.uuid)
            except ValueError:
                raise ValidationError(f"not a UUID: {self.uuid!r}", field="uuid") from None
        if self.vcpus < 1:
            raise ValidationError("vcpus must be at least 1", field="vcpus")
        if self.max_vcpus is not None and self.max_vcpus < self.vcpus:
            raise ValidationError("max_vcpus must be >= vcpus", field="max_vcpus")
        if self.memory_mib < 16:
            raise ValidationError("memory_mib must be at least 16", field="memory_mib")
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise ValidationError("max_memory_mib must be >= memory_mib", field="max_memory_mib")
        if self.disk_bus not in _TARGET_PREFIX:
            raise ValidationError(f"disk_bus must be one of {sorted(_TARGET_PREFIX)}", field="disk_bus")
        for dev in self.boot_order:
            if dev not in ("hd", "cdrom", "network"):
                raise ValidationError(f"unknown boot device {dev!r}", field="boot_order")
        if self.boot_mode not in ("bios", "uefi"):
            raise ValidationError("boot_mode must be 'bios' or 'uefi'", field="boot_mode")
        if self.boot_mode == "uefi" and not self.ovmf_code.is_file():
            raise ValidationError(
                f"UEFI boot needs OVMF firmware, {self.ovmf_code} is not installed", field="boot_mode"
            )
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ValidationError("initrd and cmdline need a kernel", field="kernel")
        if self.cpu_model == "host-model" and self.domain_type == "qemu":
            raise ValidationError("cpu_model 'host-model' needs KVM, not TCG", field="cpu_model")
        if self.nic_type in ("network", "bridge") and self.nic_model and not self.nic_source:
            raise ValidationError(f"a {self.nic_type} NIC needs nic_source", field="nic_source")
        for fname in ("name", "description", "cmdline", "vnc_password", "moldd_vm", "nic_model", "cpu_model"):
            value = getattr(self, fname)
            if isinstance(value, str) and _XML_ILLEGAL.search(value):
                raise ValidationError("control characters are not allowed", field=fname)
        for key, value in self.extra.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*$", key) or _XML_ILLEGAL.search(value):
                raise ValidationError(f"bad metadata entry {key!r}", field="extra")


def is_q35(machine: str | None) -> bool:
    return bool(machine) and (machine == "q35" or str(machine).startswith("pc-q35"))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def build_domain_xml(spec: DomainSpec) -> str:
    """Render ``spec`` (validated first) as libvirt domain XML."""
    spec.validate()
    dom = ET.Element("domain", {"type": spec.domain_type})
    _sub(dom, "name", spec.name)
    if spec.uuid:
        _sub(dom, "uuid", spec.uuid)
    if spec.description:
        _sub(dom, "description", spec.description)
    if spec.moldd_vm is not None or spec.extra:
        meta = _sub(dom, "metadata")
        ET.register_namespace(MOLDD_PREFIX, MOLDD_XMLNS)
        mvm = ET.SubElement(meta, f"{{{MOLDD_XMLNS}}}vm")
        if spec.moldd_vm is not None:
            mvm.set("name", spec.moldd_vm)
        for key, value in sorted(spec.extra.items()):
            mvm.set(key, value)

    max_mem = spec.max_memory_mib or spec.memory_mib
    _sub(dom, "memory", str(max_mem), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    max_vcpus = spec.max_vcpus or spec.vcpus
    _sub(dom, "vcpu", str(max_vcpus), placement="static", current=str(spec.vcpus))

    os_el = _sub(dom, "os")
    type_attrs = {"arch": "x86_64"}
    if spec.machine:
        type_attrs["machine"] = spec.machine
    _sub(os_el, "type", "hvm", **type_attrs)
    if spec.boot_mode == "uefi":
        _sub(os_el, "loader", str(spec.ovmf_code), readonly="yes", type="pflash")
        _sub(os_el, "nvram", template=str(spec.ovmf_vars_template))
    if spec.kernel is not None:
        _sub(os_el, "kernel", str(spec.kernel))
        if spec.initrd is not None:
            _sub(os_el, "initrd", str(spec.initrd))
        if spec.cmdline is not None:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        for dev in spec.boot_order:
            _sub(os_el, "boot", dev=dev)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.cpu_model:
        if spec.cpu_model in ("host-model", "host-passthrough"):
            _sub(dom, "cpu", mode=spec.cpu_model)
        else:
            cpu = _sub(dom, "cpu", mode="custom", match="exact")
            _sub(cpu, "model", spec.cpu_model, fallback="allow")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    prefix = _TARGET_PREFIX[spec.disk_bus]
    if spec.root_disk is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        drv = {"name": "qemu", "type": "qcow2"}
        if spec.disk_cache:
            drv["cache"] = spec.disk_cache
        _sub(disk, "driver", **drv)
        _sub(disk, "source", file=str(spec.root_disk))
        _sub(disk, "target", dev=f"{prefix}a", bus=spec.disk_bus)
    if spec.iso is not None or spec.cdrom_drive:
        cd = _sub(devices, "disk", type="file", device="cdrom")
        _sub(cd, "driver", name="qemu", type="raw")
        if spec.iso is not None:
            _sub(cd, "source", file=str(spec.iso))
        # q35 has no IDE controller: its CD-ROM sits on SATA like the disks of a sata VM
        cd_bus = "sata" if spec.disk_bus == "sata" or is_q35(spec.machine) else "ide"
        _sub(cd, "target", dev="sdc" if cd_bus == "sata" else "hdc", bus=cd_bus)
        _sub(cd, "readonly")
    if spec.nic_model:
        nic = _sub(devices, "interface", type=spec.nic_type)
        if spec.nic_type == "network":
            _sub(nic, "source", network=str(spec.nic_source))
        elif spec.nic_type == "bridge":
            _sub(nic, "source", bridge=str(spec.nic_source))
        _sub(nic, "model", type=spec.nic_model)

    serial = _sub(devices, "serial", type="pty")
    if spec.serial_log is not None:
        _sub(serial, "log", file=str(spec.serial_log), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    if spec.vnc:
        gattrs = {"type": "vnc", "port": "-1", "autoport": "yes", "listen": "127.0.0.1"}
        if spec.vnc_password:
            gattrs["passwd"] = spec.vnc_password
        graphics = _sub(devices, "graphics", **gattrs)
        _sub(graphics, "listen", type="address", address="127.0.0.1")
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
    _sub(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


def moldd_vm_name(xml: str) -> str | None:
    """The moldd VM name stored in a domain's metadata, if any."""
    el = ET.fromstring(xml).find(f"metadata/{{{MOLDD_XMLNS}}}vm")
    return None if el is None else el.get("name")
