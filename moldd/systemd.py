"""The few parts of the systemd service protocol moldd uses, without libsystemd.

* ``sd_notify``: readiness (``READY=1``), status text and watchdog pings sent as datagrams to
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
* Watchdog: ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` tell whether and how often to ping.
  :func:`async_watchdog_loop` pings only while a health check passes, so a daemon whose
  HA watcher or log writer died is restarted by systemd instead of limping on.
* Socket activation: ``$LISTEN_FDS`` / ``$LISTEN_PID``; passed descriptors start at fd 3.

Every function is a no-op (returns ``False`` / ``None`` / ``[]``) outside systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def _notify_address(env: Mapping[str, str]) -> str | bytes | None:
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        # Abstract namespace: Linux spells it with a leading NUL byte.
        return b"\0" + addr[1:].encode()
    if addr.startswith("/"):
        return addr
    return None  # vsock and other forms are not used by moldd


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one ``sd_notify`` message (e.g. ``"READY=1\\nSTATUS=up"``); ``True`` if it was sent."""
    addr = _notify_address(os.environ if env is None else env)
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(addr)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd start-up is complete (``Type=notify`` units wait for this)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_status(text: str) -> bool:
    """Free-form status line shown by ``systemctl status``."""
    return notify(f"STATUS={text}")


def notify_stopping() -> bool:
    return notify("STOPPING=1")


def notify_watchdog() -> bool:
    """One watchdog keep-alive ping."""
    return notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or ``None`` when no watchdog is armed for this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def listen_fds(*, unset_environment: bool = True, env: MutableMapping[str, str] | None = None) -> list[int]:
    """File descriptors passed by socket activation (``[3, 4, ...]``), or ``[]``.

    The descriptors are marked close-on-exec so children (qemu-img, ...) do not inherit the API socket.
    With ``unset_environment`` the variables are removed so a child process does not take them for its own.
    """
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


async def async_watchdog_loop(health: Callable[[], bool], interval: float | None = None) -> None:
    """Ping ``WATCHDOG=1`` every half watchdog period while ``health()`` is true; run until cancelled.

    When ``health()`` turns false (or raises) pings stop, and systemd kills and restarts the daemon after
    ``WatchdogSec``. Returns at once when no watchdog is armed and no ``interval`` is given.
    """
    period = interval if interval is not None else watchdog_interval()
    if period is None:
        return
    while True:
        try:
            healthy = health()
        except Exception:
            healthy = False
        if healthy:
            notify_watchdog()
        await asyncio.sleep(period / 2)
