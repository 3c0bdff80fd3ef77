"""Lab harness: real, independent libvirtd "hosts" on one machine and a tiny real Linux guest.

Used by the test suite, the benchmarks and the README demo::

    from moldd.lab import Lab, LabHost, build_guest, GuestImage, domain_xml

    with Lab(root=Path("/tmp/lab"), n_hosts=2) as lab:
        h0, h1 = lab.hosts
        img = build_guest(Path(".lab/cache"))
        conn = libvirt.open(h0.uri)
        conn.createXML(domain_xml("vm1", img, serial_log=h0.dir / "vm1.log"), 0)

See ``moldd/lab/hosts.py`` (hosts, process identification, what was verified),
``moldd/lab/guest.py`` (guest image, event codes verified) and ``moldd/lab/setup.py``.
"""

from moldd.lab.guest import (
    GUEST_READY_MARKER,
    GuestImage,
    build_guest,
    domain_xml,
)
from moldd.lab.hosts import Lab, LabError, LabHost

__all__ = [
    "GUEST_READY_MARKER",
    "GuestImage",
    "Lab",
    "LabError",
    "LabHost",
    "build_guest",
    "domain_xml",
]
