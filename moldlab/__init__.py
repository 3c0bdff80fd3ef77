"""Lab harness: real, independent libvirtd "hosts" on one machine and a tiny real Linux guest.

Used by the test suite, the benchmarks and the README demo::

    from moldlab import Lab, LabHost, build_guest, GuestImage, domain_xml

    with Lab(root=Path("/tmp/lab"), n_hosts=2) as lab:
        h0, h1 = lab.hosts
        img = build_guest(Path(".lab/cache"))
        conn = libvirt.open(h0.uri)
        conn.createXML(domain_xml("vm1", img, serial_log=h0.dir / "vm1.log"), 0)

See ``moldlab/hosts.py`` (hosts, process identification, what was verified),
``moldlab/guest.py`` (guest image, event codes verified) and ``moldlab/setup.py``.

Not production code: the moldd wheel does not contain this package (it holds ``events`` and ``moldd``
only), and ``moldd`` never imports it. Use it from a source checkout (the repository root on ``sys.path``):
``python -m moldlab prepare|up|build-guest``, ``python -m moldlab.demo``, ``python -m moldlab.fence``.
"""

from moldlab.guest import (
    GUEST_READY_MARKER,
    GuestImage,
    build_guest,
    domain_xml,
)
from moldlab.hosts import Lab, LabError, LabHost

__all__ = [
    "GUEST_READY_MARKER",
    "GuestImage",
    "Lab",
    "LabError",
    "LabHost",
    "build_guest",
    "domain_xml",
]
