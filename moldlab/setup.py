"""Idempotent preparation of this machine for lab libvirtd hosts (``python -m moldlab prepare``).

What a fresh Debian 12 machine (packages installed, no systemd, no ``libvirt-daemon-system``) needs,
all verified here:

* system user ``libvirt-qemu`` and group ``kvm``: libvirtd refuses to start QEMU guests without them
  ("Failed to parse user 'libvirt-qemu'") even when configured to run guests as root;
* ``/etc/libvirt/qemu.conf`` (absent without ``libvirt-daemon-system``) with ``stdio_handler = "file"``
  (otherwise libvirtd wants the virtlogd socket), ``user = "root"``, ``group = "root"`` (guests may read
  test files anywhere) and ``security_driver = "none"`` (no AppArmor/SELinux labelling inside a VM/container).
  Existing settings of the file are kept; only these keys are (re)written, in place;
* the mount points for the per-host bind mounts: ``/etc/libvirt/qemu``, ``/run/libvirt``,
  ``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``.

No network is needed.  Requires root.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_SETTINGS: dict[str, str] = {
    "stdio_handler": '"file"',
    "user": '"root"',
    "group": '"root"',
    "security_driver": '"none"',
}
MOUNT_POINTS = ("/etc/libvirt/qemu", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
                "/var/log/libvirt")


def _ensure_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return False
    except KeyError:
        subprocess.run(["groupadd", "-r", name], check=True, capture_output=True)
        return True


def _ensure_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        cmd = ["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", "-d", "/var/lib/libvirt"]
        try:
            grp.getgrnam("kvm")
            cmd += ["-G", "kvm"]
        except KeyError:
            pass
        subprocess.run([*cmd, name], check=True, capture_output=True)
        return True


def set_conf_values(text: str, settings: dict[str, str]) -> str:
    """``text`` with each ``key = value`` of ``settings`` set: an active line is replaced in place,
    otherwise the value is appended.  Commented-out defaults and every other line are kept."""
    lines = text.splitlines()
    done: set[str] = set()
    out: list[str] = []
    for line in lines:
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m and m.group(1) in settings:
            key = m.group(1)
            if key in done:
                continue  # drop duplicates of a key we manage
            out.append(f"{key} = {settings[key]}")
            done.add(key)
        else:
            out.append(line)
    missing = [k for k in settings if k not in done]
    if missing:
        if out and out[-1].strip():
            out.append("")
        out.append("# set by moldlab.setup")
        out.extend(f"{k} = {settings[k]}" for k in missing)
    return "\n".join(out) + "\n"


def prepare_host(verbose: bool = False) -> list[str]:
    """Make this machine ready for lab hosts.  Idempotent; returns what it changed."""
    if os.geteuid() != 0:
        raise PermissionError("moldlab prepare needs root (useradd, /etc/libvirt, mount namespaces)")
    changed: list[str] = []
    if _ensure_group("kvm"):
        changed.append("groupadd -r kvm")
    if _ensure_user("libvirt-qemu"):
        changed.append("useradd -r libvirt-qemu")
    QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
    old = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    new = set_conf_values(old, QEMU_CONF_SETTINGS)
    if new != old:
        tmp = QEMU_CONF.with_name(QEMU_CONF.name + ".moldd-tmp")
        tmp.write_text(new)
        tmp.chmod(0o600)
        tmp.replace(QEMU_CONF)
        changed.append(f"edited {QEMU_CONF}")
    for d in MOUNT_POINTS:
        p = Path(d)
        if not p.is_dir():
            p.mkdir(parents=True, exist_ok=True)
            changed.append(f"mkdir {d}")
    if verbose:
        for c in changed or ["nothing to do"]:
            print(c)
    return changed
