#!/usr/bin/env bash
# Installs everything moldd needs on a fresh Debian machine (idempotent): system packages, a virtualenv in .venv
# with moldd and its test tools, and the host preparation libvirtd needs here (user, group, qemu.conf).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
          qemu-system-x86 qemu-utils busybox-static python3 python3-venv python3-dev gcc
          libsqlite3-dev libssl-dev  # events/_chainscan.c (the C scan of `python -m events verify`) and moldd/projection/_foldrows.c (setup.py)
          chromium  # chromium: the status page's browser test (headless, DevTools protocol)
          postgresql)  # PostgreSQL: tests/benchmarks start their own throw-away server (initdb + pg_ctl)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import events._chainscan' 2>/dev/null \
    || echo "warning: events._chainscan (the C scan of events.verify) was not built: verify runs in pure Python" >&2
.venv/bin/python -c 'import moldd.projection._foldrows' 2>/dev/null \
    || echo "warning: moldd.projection._foldrows (the fold's C accelerator) was not built: the fold runs in pure Python" >&2
$SUDO .venv/bin/python -m moldlab prepare
