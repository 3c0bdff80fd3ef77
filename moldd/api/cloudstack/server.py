"""The optional TCP listener of the CloudStack API (``[cloudstack].port``), with TLS when configured."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from moldd.api.cloudstack.handler import CloudStackEndpoint, add_route
from moldd.api.protocol import LimitedSite, protocol_factory
from moldd.config import ApiConfig
from moldd.domain.errors import present

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("moldd.cloudstack")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that refuses anything older than TLS 1.2."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def make_tcp_app(
    endpoint: CloudStackEndpoint, max_request_bytes: int, metrics_handler: Handler | None = None
) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes + 1)
    add_route(app, endpoint)
    if metrics_handler is not None:  # GET /metrics with its own bearer token (moldd.observe.web.metrics_route)
        app.router.add_get("/metrics", metrics_handler)
    return app


class _TlsLimitedSite(LimitedSite):
    """The socket API's limits ([api]: header/body timeouts, connection cap, backlog) on a TCP socket, with TLS."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, limits: ApiConfig, tls: ssl.SSLContext | None) -> None:
        super().__init__(runner, sock, limits)
        self._tls = tls

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = present(self._runner.server, "the aiohttp server of the runner")
        self._server = await asyncio.get_running_loop().create_server(
            protocol_factory(server, self._limits), sock=self._sock, backlog=self._backlog, ssl=self._tls
        )


def _listening_socket(bind: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.create_server((bind, port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


@dataclass
class TcpListener:
    runner: web.AppRunner
    port: int

    async def async_close(self) -> None:
        await self.runner.cleanup()


async def async_serve_tcp(
    endpoint: CloudStackEndpoint,
    bind: str,
    port: int,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_request_bytes: int = 65536,
    limits: ApiConfig | None = None,
    metrics_handler: Handler | None = None,
) -> TcpListener:
    """Serve ``/client/api`` on ``bind:port`` (port 0: any free port, see ``.port``). Only signed requests
    get in: the endpoint must have been built with ``tcp=True``."""
    if not endpoint.tcp:
        raise ValueError("a TCP listener needs an endpoint that requires signed requests (tcp=True)")
    ctx = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    app = make_tcp_app(endpoint, max_request_bytes, metrics_handler)
    # A query string up to twice the limit still reaches the handler and gets a CloudStack-shaped refusal
    # (aiohttp's default line limit is 8190 bytes); a longer request line is refused by aiohttp itself (400).
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, max_line_size=2 * max_request_bytes + 8192
    )
    await runner.setup()
    limits = limits or ApiConfig()
    try:
        sock = _listening_socket(bind, port, limits.backlog)
        site = _TlsLimitedSite(runner, sock, limits, ctx)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    actual = sock.getsockname()[1]
    log.info("cloudstack_listening", bind=bind, port=actual, tls=ctx is not None)
    return TcpListener(runner=runner, port=actual)
