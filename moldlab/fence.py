"""Standalone fencing command for lab hosts (usable as moldd's configured fencing command).

    python -m moldlab.fence --host-dir DIR [--power-off] [--timeout S]

Kills (SIGKILL) every QEMU process of the lab host whose private directory is ``DIR`` — what an IPMI
power-off does to that host's guests — and with ``--power-off`` its libvirtd as well.  Processes are
identified by their mount namespace's ``/run/libvirt`` being ``DIR/run`` (see :mod:`moldlab.hosts`),
so it also finds QEMUs orphaned after libvirtd died, and works from any process (no Lab object needed).

Exit status: 0 when, afterwards, no QEMU (and with ``--power-off`` no libvirtd) of that host is alive;
1 when some process survived (the caller must NOT assume the guests are dead); 2 on usage errors
(e.g. DIR is not a lab host dir).  Prints one JSON line: ``{"host_dir", "killed", "survivors"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moldlab.hosts import kill_host_processes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moldlab.fence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-dir", required=True, type=Path, help="the lab host's private directory")
    ap.add_argument("--power-off", action="store_true", help="also kill the host's libvirtd")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the processes to die")
    args = ap.parse_args(argv)
    host_dir: Path = args.host_dir.resolve()
    if not (host_dir / "run").is_dir():
        print(json.dumps({"host_dir": str(host_dir), "error": "not a lab host dir (no run/)"}))
        return 2
    killed, survivors = kill_host_processes(host_dir, qemu=True, libvirtd=args.power_off,
                                            timeout=args.timeout)
    print(json.dumps({"host_dir": str(host_dir), "killed": killed, "survivors": survivors}))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
