"""sd_notify, the watchdog and socket activation against real sockets and a real child process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moldd import systemd
from moldlab.testing.load import scaled


@pytest.fixture
def notify_socket(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = sock_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_ready_and_status_reach_the_notify_socket(notify_socket: socket.socket) -> None:
    assert systemd.notify_ready("serving 3 hosts")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 3 hosts"
    assert systemd.notify_status("degraded")
    assert notify_socket.recv(4096) == b"STATUS=degraded"
    assert systemd.notify_watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_notify_uses_the_abstract_namespace_for_at_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"moldd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify_ready()
        assert sock.recv(4096) == b"READY=1"


def test_notify_outside_systemd_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert systemd.notify_watchdog() is False


def test_watchdog_interval_from_env() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({}) is None


async def test_watchdog_pings_only_while_healthy(notify_socket: socket.socket) -> None:
    healthy = [True]
    loop_task = asyncio.create_task(systemd.async_watchdog_loop(lambda: healthy[0], interval=0.1))
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()

    async def ping(timeout: float) -> bool:
        """True when a ping arrives within ``timeout`` (no fixed window: a busy machine only delays it)."""
        try:
            data = await asyncio.wait_for(loop.sock_recv(notify_socket, 64), timeout)
        except TimeoutError:
            return False
        assert data == b"WATCHDOG=1"
        return True

    for _ in range(3):  # it keeps pinging while healthy
        assert await ping(scaled(10))
    healthy[0] = False
    # at most the ping already past its health check still lands; then none for many intervals
    late = 0
    while await ping(1.0):
        late += 1
        assert late <= 1, "the watchdog kept pinging while unhealthy"
    healthy[0] = True
    assert await ping(scaled(10))  # and pings again once healthy
    loop_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop_task


async def test_watchdog_loop_returns_when_no_watchdog_is_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.async_watchdog_loop(lambda: True), 1)


_CHILD = r"""
import json, os, socket
from moldd import systemd
fds = systemd.listen_fds()
sock = socket.socket(fileno=fds[0])
print(json.dumps({"fds": fds, "name": sock.getsockname(), "env_left": "LISTEN_FDS" in os.environ,
                  "cloexec": not os.get_inheritable(fds[0])}))
"""


def test_listen_fds_takes_the_socket_systemd_passed_at_fd_3(sock_dir: Path) -> None:
    path = str(sock_dir / "api.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        fd = listener.fileno()
        # As systemd does: the socket at fd 3, LISTEN_PID set to the pid that exec()s (sh's $$).
        proc = subprocess.run(
            ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -c "$0"', _CHILD],
            preexec_fn=lambda: os.dup2(fd, 3), pass_fds=(3,) if fd != 3 else (),
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    assert json.loads(proc.stdout) == {"fds": [3], "name": path, "env_left": False, "cloexec": True}


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2"}
    assert systemd.listen_fds(env=env) == []
    assert env == {}
    assert systemd.listen_fds(env={}) == []
