"""A tiny, real Linux guest that boots in a few seconds under TCG.

Kernel: Debian's ``linux-image-cloud-amd64`` (a meta package whose only dependency is the versioned
``linux-image-<ver>-cloud-amd64`` package, see ``apt-cache depends``).  Both ``.deb`` files are fetched
with ``apt-get download`` into ``<cache_dir>/debs`` and unpacked with ``dpkg-deb -x``.

Initramfs: ``busybox-static`` plus an ``/init`` shell script, packed with ``busybox cpio -o -H newc``
(there is no system ``cpio``) and gzip-compressed.  The init

* mounts proc/sys/devtmpfs and re-opens ``/dev/console`` (works whether or not the kernel found a console),
* ``insmod``s ``evdev`` and ``button`` (modules in the cloud kernel, ``CONFIG_INPUT_EVDEV=m``,
  ``CONFIG_ACPI_BUTTON=m``), and ``virtio_pci`` + ``virtio_balloon`` so live memory changes reach the guest
  (dependencies are read from each module's ``depends=`` modinfo and loaded
  first; ``.ko.xz`` / ``.ko.gz`` are decompressed at build time),
* creates ``/var/log`` and ``/var/run`` (busybox acpid silently does nothing without its log file),
* starts busybox ``acpid`` whose action for the power button is ``/etc/acpi/PWRF/00000080``
  (busybox maps ``KEY_POWER`` to ``PWRF/00000080`` relative to its config dir ``/etc/acpi``; the action
  is an executable script running ``poweroff -f``),
* prints :data:`GUEST_READY_MARKER` on the serial console once acpid runs,
* honours kernel command line arguments ``halt_after=N`` (``poweroff -f`` after N seconds: a
  guest-initiated power-off) and ``panic_after=N`` (``echo c > /proc/sysrq-trigger``: a kernel panic;
  NOT verified: without a pvpanic device libvirt does not see it, and ``panic=-1`` makes the guest
  reboot at once).

Verified here (libvirt 9.0, QEMU 7.2, TCG, 1 vCPU, 128 MiB): boots to the marker in about 2-3 s;
``virDomain.shutdown()`` (ACPI) and ``halt_after`` both produce the lifecycle events
SHUTDOWN(6)/GUEST(1) then STOPPED(5)/SHUTDOWN(0).  See ``tests/lab/test_lab.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

GUEST_READY_MARKER = "MOLDD-GUEST-READY"
GUEST_HALTING_MARKER = "MOLDD-GUEST-HALTING"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# modules the init loads, in this order (dependencies are prepended automatically)
GUEST_MODULES = ("evdev", "button", "virtio_pci", "virtio_balloon")  # balloon: live memory changes
BASE_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable no_timer_check"

# Bump when the init script or the layout changes: a new initrd is then built next to the old one.
_INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /var/log /var/run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
for m in $(cat /etc/moldd-modules); do
    insmod "/lib/modules/$m" || echo "moldd-init: insmod $m failed"
done
# wait (max ~3 s) for the input devices of the power button to appear before acpid scans them
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 30 ]; do usleep 100000; i=$((i+1)); done
acpid -c /etc/acpi -l /var/log/acpid.log -p /var/run/acpid.pid
hostname moldd-guest
halt_after=""
panic_after=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        halt_after=*) halt_after="${arg#halt_after=}" ;;
        panic_after=*) panic_after="${arg#panic_after=}" ;;
    esac
done
if [ -n "$halt_after" ]; then
    (sleep "$halt_after"; echo "MOLDD-GUEST-HALTING"; poweroff -f) &
fi
if [ -n "$panic_after" ]; then
    (sleep "$panic_after"; echo "MOLDD-GUEST-PANICKING"; echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger) &
fi
echo "MOLDD-GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
while true; do sleep 3600; done
"""

_ACPI_POWER_ACTION = """#!/bin/sh
echo "MOLDD-GUEST-ACPI-POWEROFF" > /dev/console
poweroff -f
"""


class GuestBuildError(RuntimeError):
    """The guest image could not be built (download, unpack or packing failed)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass ``kernel`` / ``initrd`` to ``<os><kernel>`` / ``<os><initrd>``."""

    kernel: Path
    initrd: Path
    kernel_version: str = ""
    cmdline: str = BASE_CMDLINE


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _kernel_package_name() -> str:
    """``linux-image-<ver>-cloud-amd64``: the dependency of the meta package."""
    res = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            dep = line.split(":", 1)[1].strip()
            if dep.startswith("linux-image-"):
                return dep
    raise GuestBuildError(f"apt-cache depends {KERNEL_META_PACKAGE} found no kernel: {res.stdout}{res.stderr}")


def _download_kernel_debs(debs: Path) -> Path:
    """The versioned kernel ``.deb`` in ``debs`` (downloaded only if none is cached)."""
    debs.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs.glob("linux-image-*-cloud-amd64_*.deb"))
    if cached:
        return cached[-1]
    pkg = _kernel_package_name()
    cmd = ["apt-get", "download", KERNEL_META_PACKAGE, pkg]
    res = _run(cmd, cwd=debs)
    if res.returncode != 0:
        upd = _run(["apt-get", "update"])
        res = _run(cmd, cwd=debs)
        if res.returncode != 0:
            raise GuestBuildError(
                f"apt-get download failed: {res.stderr.strip()} (apt-get update: {upd.stderr.strip()})"
            )
    cached = sorted(debs.glob(f"{pkg}_*.deb"))
    if not cached:
        raise GuestBuildError(f"apt-get download produced no {pkg}_*.deb in {debs}")
    return cached[-1]


def _modinfo_depends(data: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section (NUL-separated key=value strings)."""
    for chunk in data.split(b"\0"):
        if chunk.startswith(b"depends="):
            val = chunk[len(b"depends="):].decode()
            return [d for d in val.split(",") if d]
    return []


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        raise GuestBuildError(f"{path}: zstd-compressed modules are not supported")
    return raw


def _find_module(moddir: Path, name: str) -> Path:
    variants = {name, name.replace("_", "-"), name.replace("-", "_")}
    for p in moddir.rglob("*.ko*"):
        base = p.name.split(".ko")[0]
        if base in variants:
            return p
    raise GuestBuildError(f"module {name} not found under {moddir}")


def _collect_modules(moddir: Path, names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(file name, uncompressed bytes) in insmod order: dependencies before dependents."""
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise GuestBuildError(f"module dependency cycle: {(*stack, name)}")
        data = _read_module(_find_module(moddir, name))
        for dep in _modinfo_depends(data):
            visit(dep, (*stack, name))
        seen.add(name)
        out.append((f"{name}.ko", data))

    for n in names:
        visit(n, ())
    return out


def _build_initrd(modules: list[tuple[str, bytes]], dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="moldd-initrd-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "var/log",
                  "var/run", "etc/acpi/PWRF", "lib/modules", "root"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        (root / "bin/sh").symlink_to("busybox")
        init = root / "init"
        init.write_text(_INIT_SCRIPT)
        init.chmod(0o755)
        action = root / "etc/acpi/PWRF/00000080"
        action.write_text(_ACPI_POWER_ACTION)
        action.chmod(0o755)
        for fname, data in modules:
            (root / "lib/modules" / fname).write_bytes(data)
        (root / "etc/moldd-modules").write_text("\n".join(f for f, _ in modules) + "\n")
        try:  # the kernel wants /dev/console before init runs; the init copes if this is missing
            os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
        except OSError:
            pass
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        names.insert(0, ".")
        with open(Path(tmp) / "initrd.cpio", "wb") as out:
            res = subprocess.run(
                [str(BUSYBOX), "cpio", "-o", "-H", "newc"],
                input="\n".join(names).encode() + b"\n", cwd=root, stdout=out,
                stderr=subprocess.PIPE, check=False,
            )
        if res.returncode != 0:
            raise GuestBuildError(f"busybox cpio failed: {res.stderr.decode(errors='replace')}")
        tmp_dest = dest.with_name(dest.name + ".tmp")
        with open(Path(tmp) / "initrd.cpio", "rb") as src, gzip.open(tmp_dest, "wb", compresslevel=6) as gz:
            shutil.copyfileobj(src, gz)
        tmp_dest.replace(dest)


def build_guest(cache_dir: Path) -> GuestImage:
    """Build (or reuse from ``cache_dir``) the guest kernel + initramfs.  Idempotent.

    Network is only needed the first time (``apt-get download`` of the kernel packages); later calls
    reuse ``<cache_dir>/debs`` and the built files.
    """
    cache_dir = Path(cache_dir).resolve()
    if not BUSYBOX.exists():
        raise GuestBuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
    deb = _download_kernel_debs(cache_dir / "debs")
    kver = deb.name.split("_")[0].removeprefix("linux-image-")
    digest = hashlib.sha256(
        (_INIT_SCRIPT + _ACPI_POWER_ACTION + ",".join(GUEST_MODULES)).encode() + BUSYBOX.read_bytes()
    ).hexdigest()[:12]
    out = cache_dir / f"guest-{kver}"
    kernel = out / "vmlinuz"
    initrd = out / f"initrd-{digest}.img"
    if kernel.exists() and initrd.exists():
        return GuestImage(kernel=kernel, initrd=initrd, kernel_version=kver)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moldd-kernel-", dir=cache_dir) as tmp:
        res = _run(["dpkg-deb", "-x", str(deb), tmp])
        if res.returncode != 0:
            raise GuestBuildError(f"dpkg-deb -x {deb} failed: {res.stderr}")
        vmlinuz = sorted(Path(tmp).glob("boot/vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"no boot/vmlinuz-* in {deb}")
        moddirs = sorted(Path(tmp).glob("lib/modules/*")) + sorted(Path(tmp).glob("usr/lib/modules/*"))
        if not moddirs:
            raise GuestBuildError(f"no lib/modules in {deb}")
        modules = _collect_modules(moddirs[0], GUEST_MODULES)
        if not kernel.exists():
            shutil.copyfile(vmlinuz[0], kernel.with_name("vmlinuz.tmp"))
            kernel.with_name("vmlinuz.tmp").replace(kernel)
        _build_initrd(modules, initrd)
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=kver)


def domain_xml(
    name: str,
    image: GuestImage,
    memory_mib: int = 128,
    vcpus: int = 1,
    serial_log: Path | None = None,
    cmdline_extra: str = "",
    uuid: str | None = None,
) -> str:
    """Minimal TCG domain booting ``image``; for tests of the lab itself (moldd has its own builder).

    ``serial_log``: the serial console (ttyS0) goes to that file (``type='file'``; verified to work);
    ``None`` gives a ``pty`` serial console usable with ``virsh console``.
    """
    cmdline = f"{image.cmdline} {cmdline_extra}".strip()
    if serial_log is not None:
        serial = f"<serial type='file'><source path='{escape(str(serial_log))}'/><target port='0'/></serial>"
    else:
        serial = "<serial type='pty'><target port='0'/></serial>"
    uuid_xml = f"<uuid>{escape(uuid)}</uuid>" if uuid else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>{uuid_xml}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {serial}
    <memballoon model='none'/>
  </devices>
</domain>
"""
