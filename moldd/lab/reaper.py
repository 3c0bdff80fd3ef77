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


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


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
        if _comm(info.si_pid).startswith("qemu-system"):
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                pass
        else:
            time.sleep(0.005)  # someone else's child: its owner reaps it


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
