"""``python -m moldlab prepare`` / ``python -m moldlab up --root DIR --hosts N``.

``up`` prepares the machine, builds the guest (cache: ``$MOLDD_LAB_CACHE`` or ``<root>/cache``), starts N
hosts, prints one JSON document (hosts, URIs, guest kernel/initrd) on stdout, writes it to
``<root>/lab.json`` as well, and stays in the foreground until SIGTERM/SIGINT, then stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from moldlab.guest import build_guest
from moldlab.hosts import Lab
from moldlab.setup import prepare_host


def _up(root: Path, n_hosts: int, cache: Path | None, name_prefix: str) -> int:
    root = root.resolve()
    prepare_host()
    cache_dir = cache or Path(os.environ.get("MOLDD_LAB_CACHE") or root / "cache")
    image = build_guest(cache_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lab = Lab(root, n_hosts=n_hosts, name_prefix=name_prefix, prepare=False,
              qemu_caps_cache=cache_dir / "qemu-caps")
    lab.start()
    try:
        info = lab.describe()
        info["guest"] = {"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": image.cmdline}
        text = json.dumps(info, indent=2)
        (root / "lab.json").write_text(text + "\n")
        print(text, flush=True)
        print(f"# lab up; {root / 'lab.json'}; SIGTERM/Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        lab.stop()
        print("# lab stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moldlab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="prepare this machine (users, /etc/libvirt/qemu.conf, dirs); idempotent")
    up = sub.add_parser("up", help="start N libvirtd hosts and stay in the foreground")
    up.add_argument("--root", type=Path, required=True)
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--cache", type=Path, default=None, help="guest/QEMU-caps cache dir")
    up.add_argument("--name-prefix", default="host")
    guest = sub.add_parser("build-guest", help="build (or reuse) the guest kernel + initramfs")
    guest.add_argument("--cache", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare_host(verbose=True)
        return 0
    if args.cmd == "build-guest":
        img = build_guest(args.cache)
        print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd), "cmdline": img.cmdline}))
        return 0
    return _up(args.root, args.hosts, args.cache, args.name_prefix)


if __name__ == "__main__":
    sys.exit(main())
