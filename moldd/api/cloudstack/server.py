"""The optional TCP listener of the CloudStack API (``[cloudstack].port``), with TLS when configured."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from moldd.api.cloudstack.handler import CloudStackEndpoint, add_route

log = structlog.get_logger("moldd.cloudstack")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that refuses anything older than TLS 1.2."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def make_tcp_app(endpoint: CloudStackEndpoint, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes + 1)
    add_route(app, endpoint)
    return app


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
) -> TcpListener:
    """Serve ``/client/api`` on ``bind:port`` (port 0: any free port, see ``.port``). Only signed requests
    get in: the endpoint must have been built with ``tcp=True``."""
    if not endpoint.tcp:
        raise ValueError("a TCP listener needs an endpoint that requires signed requests (tcp=True)")
    ctx = tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    app = make_tcp_app(endpoint, max_request_bytes)
    # A query string up to twice the limit still reaches the handler and gets a CloudStack-shaped refusal
    # (aiohttp's default line limit is 8190 bytes); a longer request line is refused by aiohttp itself (400).
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, max_line_size=2 * max_request_bytes + 8192
    )
    await runner.setup()
    site = web.TCPSite(runner, bind, port, ssl_context=ctx)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    actual = sockets[0].getsockname()[1] if sockets else port
    log.info("cloudstack_listening", bind=bind, port=actual, tls=ctx is not None)
    return TcpListener(runner=runner, port=actual)
