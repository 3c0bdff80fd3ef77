"""``python -m moldlab.demo --root DIR``: two real local libvirtd hosts, the tiny lab guest as a template, and moldd
serving a demo config, all in the foreground until Ctrl-C (everything it started is stopped on the way out)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moldd.daemon import async_main
from moldd.logging import configure_logging
from moldlab import Lab, build_guest
from moldlab.testing.harness import write_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moldlab.demo")
    parser.add_argument("--root", type=Path, default=Path("var/demo"))
    parser.add_argument("--hosts", type=int, default=2)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    cache = Path(__file__).resolve().parent.parent / ".lab" / "cache"
    print("building the demo guest (a real Linux kernel + busybox initramfs; first run downloads the kernel)...")
    guest = build_guest(cache)
    with Lab(root / "lab", n_hosts=args.hosts, qemu_caps_cache=cache / "qemu-caps") as lab:
        config = write_config(
            root / "moldd", lab.hosts, guest, daemon={"log_level": "info", "stop_timeout_s": 10}, max_vms=5
        )
        sock = config.socket
        print(
            f"\nmoldd demo: {len(lab.hosts)} libvirtd hosts under {root / 'lab'}, config {config.path}\n"
            f"try, in another terminal:\n"
            f"  export MOLDD_SOCKET={sock}\n"
            f"  .venv/bin/moldctl vm deploy --template tiny --offering small --ha\n"
            f"  .venv/bin/moldctl vm list\n"
            f"  .venv/bin/moldd-audit history {config.database} <vm name>\n",
            flush=True,
        )
        configure_logging(config.log_level)
        try:
            return asyncio.run(async_main(config))
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
