"""The adapter between the asyncio daemon and libvirt hosts; no libvirt call ever blocks the loop.

* :mod:`moldd.libvirt.bridge`  — libvirt's event loop thread, worker pools, error translation;
* :mod:`moldd.libvirt.events`  — :class:`DomainEvent`, :class:`HostLinkEvent` (names from libvirt constants);
* :mod:`moldd.libvirt.host`    — :class:`HostConnection`: self-healing connection + async domain operations;
* :mod:`moldd.libvirt.xml`     — :class:`DomainSpec` → domain XML;
* :mod:`moldd.libvirt.storage` — qemu-img as async subprocesses.
"""

from moldd.libvirt.bridge import LibvirtBridge, translate_error
from moldd.libvirt.events import DomainEvent, HostLinkEvent
from moldd.libvirt.host import DomainInfo, HostConnection, SnapshotInfo
from moldd.libvirt.xml import DomainSpec, build_domain_xml

__all__ = [
    "DomainEvent",
    "DomainInfo",
    "DomainSpec",
    "HostConnection",
    "HostLinkEvent",
    "LibvirtBridge",
    "SnapshotInfo",
    "build_domain_xml",
    "translate_error",
]
