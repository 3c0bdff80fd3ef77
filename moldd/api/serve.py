"""Binding the API socket (or taking it from systemd) and running the server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from moldd import systemd
from moldd.api.app import async_answer_command, make_app
from moldd.api.cloudstack.handler import CloudStackEndpoint
from moldd.api.keys import ApiSettings
from moldd.api.peercred import AccessPolicy
from moldd.api.protocol import AcceptErrorFilter, LimitedSite
from moldd.app.bus import CommandBus
from moldd.config import ApiConfig
from moldd.domain.errors import ValidationError
from moldd.observe.metrics import Metrics

log = structlog.get_logger("moldd.api")

DEFAULT_SOCKET = "/run/moldd/moldd.sock"
DEFAULT_MODE = 0o660


def resolve_group(group: str | int | None) -> int | None:
    """A group name or gid → gid; ``None`` stays ``None``."""
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValidationError(f"no such group {group!r} for the API socket", field="api.group") from None


def bind_unix_socket(
    path: str | os.PathLike[str], *, mode: int = DEFAULT_MODE, gid: int | None = None, backlog: int = 512
) -> socket.socket:
    """A listening ``AF_UNIX`` socket at ``path`` with ``mode`` and group ``gid``.

    A stale socket file left by a crashed daemon is replaced; a socket another daemon still answers on
    is not (``OSError``). The umask keeps the file from ever being wider than ``mode``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise OSError(f"{target} exists and is not a socket; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(target))
            except OSError:
                target.unlink()  # nobody listens: stale
            else:
                raise OSError(f"another process is already serving on {target}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(target))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(target, mode)
    if gid is not None:
        os.chown(target, -1, gid)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


@dataclass
class ApiServer:
    """A running API server; ``await server.async_close()`` stops it and removes a socket it created."""

    runner: web.AppRunner
    sock: socket.socket
    path: str | None
    owns_path: bool
    accept_errors: AcceptErrorFilter | None = None

    async def async_close(self) -> None:
        await self.runner.cleanup()
        if self.accept_errors is not None:
            self.accept_errors.uninstall()
        if self.owns_path and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


async def async_serve(
    bus: CommandBus,
    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
    *,
    mode: int = DEFAULT_MODE,
    group: str | int | None = None,
    sock: socket.socket | None = None,
    use_socket_activation: bool = True,
    settings: ApiSettings | None = None,
    shutdown_timeout_s: float = 5.0,
    api: ApiConfig | None = None,
    cloudstack: CloudStackEndpoint | None = None,
    group_role: str = "admin",
    admin_group: str | int | None = None,
    metrics: Metrics | None = None,
) -> ApiServer:
    """Serve the API for ``bus`` and return once it accepts connections.

    The listening socket is, in order: ``sock`` if given; the first socket systemd passed
    (``moldd.socket``, when ``use_socket_activation``); else a new one bound at ``socket_path`` with
    ``mode`` and ``group``. ``group`` is also the group whose members may connect (see
    :func:`moldd.api.peercred.authorize`).
    """
    gid = resolve_group(group)
    limits = api or ApiConfig()
    if settings is None:
        settings = ApiSettings(max_body_bytes=limits.max_body_bytes)
    owns_path = False
    if sock is None and use_socket_activation:
        fds = systemd.listen_fds()
        if fds:
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            for extra in fds[1:]:
                os.close(extra)
    if sock is None:
        sock = bind_unix_socket(socket_path, mode=mode, gid=gid, backlog=limits.backlog)
        owns_path = True
    path = sock.getsockname() if sock.family == socket.AF_UNIX else None
    access = AccessPolicy(gid, group_role=group_role, admin_group_gid=resolve_group(admin_group))
    app = make_app(bus, access=access, settings=settings, cloudstack=cloudstack, metrics=metrics)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=limits.idle_timeout_s,
    )
    await runner.setup()
    if metrics is not None and runner.server is not None:
        metrics.track_server(runner.server)
    accept_errors = AcceptErrorFilter(asyncio.get_running_loop())
    # The connections' fast lane for POST /v1/command (moldd.api.protocol), unless something would have to see
    # each response on its way out (an on_response_prepare signal), which only aiohttp's path runs.
    lane = None if app.on_response_prepare else functools.partial(async_answer_command, app)
    try:
        await LimitedSite(runner, sock, limits, lane, settings.max_body_bytes).start()
    except BaseException:
        await runner.cleanup()
        raise
    accept_errors.install()
    log.info(
        "api_listening",
        socket=path,
        mode=oct(mode),
        gid=gid,
        activated=not owns_path,
        backlog=limits.backlog,
        max_connections=limits.max_connections,
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
    )
    return ApiServer(
        runner=runner,
        sock=sock,
        path=path if isinstance(path, str) else None,
        owns_path=owns_path,
        accept_errors=accept_errors,
    )
