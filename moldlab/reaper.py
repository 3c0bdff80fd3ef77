"""Reap the lab's QEMU processes promptly, as an init system would.

QEMU daemonizes, so its parent is the nearest *subreaper* above libvirtd, or pid 1. In a container whose pid 1
never reaps, a killed QEMU stays a zombie, ``kill(pid, 0)`` keeps succeeding, and libvirtd waits a second or two
before it reports the domain STOPPED — on a real host systemd reaps at once. Making the process that runs the lab
a subreaper that reaps exited QEMUs restores real-host timing. Only QEMU processes are reaped: other children
(subprocess/asyncio) belong to their owners."""

from __future__ import annotations

import ctypes
import os
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
_started = False
_lock = threading.Lock()


# Orphans the lab leaves us: QEMU (daemonized), and libvirtd's helpers once a test kills libvirtd. A killed lab
# libvirtd is one of our Popen children; reaping it makes Popen report returncode 0, which the lab treats as
# "not running" — true. Other children (qemu-img, fence commands) belong to asyncio or subprocess: left alone.
REAPED = ("qemu-system", "rpc-libvirtd", "libvirtd", "rpc-virt")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _zombie_children() -> list[int]:
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        return pids
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    out.append(pid)
        except (OSError, IndexError):
            pass
    return out


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _loop() -> None:
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            time.sleep(0.05)
            continue
        except InterruptedError:
            continue
        if info is None:
            time.sleep(0.01)
            continue
        if _comm(info.si_pid).startswith(REAPED):
            _reap(info.si_pid)
            continue
        # The first exited child is someone else's: do not wait behind it, reap ours by pid, then back off.
        for pid in _zombie_children():
            if _comm(pid).startswith(REAPED):
                _reap(pid)
        time.sleep(0.02)


def ensure_reaper() -> bool:
    """Make this process a child subreaper and start the reaping thread (once). False where unsupported."""
    global _started
    with _lock:
        if _started:
            return True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                return False
        except OSError:
            return False
        threading.Thread(target=_loop, name="lab-reaper", daemon=True).start()
        _started = True
        return True
