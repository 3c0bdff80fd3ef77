"""The aiohttp application: routes, identity and error middlewares, lifecycle."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from moldd.api import handlers
from moldd.api.cloudstack.handler import CloudStackEndpoint
from moldd.api.cloudstack.handler import add_route as add_cloudstack_route
from moldd.api.keys import ACCESS_KEY, ACTOR_KEY, BUS_KEY, CLOSING_KEY, SETTINGS_KEY, ApiSettings
from moldd.api.peercred import AccessPolicy, peer_creds
from moldd.app.bus import Actor, CommandBus
from moldd.domain.errors import MolddError, PermissionDenied
from moldd.observe import web as observe_web
from moldd.observe.metrics import Metrics

log = structlog.get_logger("moldd.api")

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "invalid_argument",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as ``{"ok": false, "error": {code, message, field}}``; tracebacks stay in the log.
    The peer's identity is settled inside it (:func:`async_identify`): one middleware frame per request."""
    try:
        await async_identify(request)
        return await handler(request)
    except MolddError as err:
        return handlers.error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_argument" if exc.status < 500 else "internal")
        return handlers.plain_error_response(exc.status, code, exc.reason)
    except asyncio.CancelledError:
        raise
    except ConnectionError as exc:
        # the client went away (mid-body, say): nothing to answer and nothing wrong with the daemon
        log.debug("client_gone", path=request.path, method=request.method, error=repr(exc))
        return handlers.plain_error_response(400, "client_gone", "the connection was lost", "body")
    except Exception:
        log.exception("internal_error", path=request.path, method=request.method)
        return handlers.plain_error_response(
            500, "internal", "internal error; the daemon log has the details"
        )


async def async_identify(request: web.Request) -> None:
    """Turn the kernel-reported peer credentials into the request's :class:`Actor`, or refuse."""
    request[ACTOR_KEY] = await async_actor_of(request.app[ACCESS_KEY], request.protocol, request.transport)


async def async_actor_of(policy: AccessPolicy, conn: Any, transport: Any) -> Actor:
    """The :class:`Actor` on the other end of ``conn`` (its ``transport``), or ``PermissionDenied``.

    The kernel fixes a connection's credentials (and groups) at ``connect()``, so the answer is kept on the
    connection (:class:`~moldd.api.protocol.JsonRequestHandler`) until the policy's look-up it came from
    expires: the next requests on a keep-alive connection skip the ``getsockopt`` calls and the look-up."""
    kept = getattr(conn, "identity", None)
    if kept is not None and kept[0] is policy and policy.now() < kept[1]:
        actor: Actor = kept[2]
        return actor
    sock = transport.get_extra_info("socket") if transport else None
    try:
        if sock is None or sock.family != socket.AF_UNIX:
            raise OSError("not a Unix socket")
        creds = peer_creds(sock)
    except OSError:
        raise PermissionDenied("moldd answers only local clients on its Unix socket") from None
    actor = await policy.async_actor_for(creds, sock)
    if hasattr(conn, "identity"):
        conn.identity = (policy, policy.valid_until(creds), actor)
    return actor


async def async_answer_command(app: web.Application, conn: Any, raw: bytes) -> tuple[int, bytes]:
    """The fast lane's ``POST /v1/command`` (see :class:`moldd.api.protocol.JsonRequestHandler`): what
    ``error_middleware`` + :func:`handlers.async_command` answer for the same request, as (status, body)."""
    try:
        actor = await async_actor_of(app[ACCESS_KEY], conn, conn.transport)
        return 200, await handlers.async_run_command(app, actor, raw)
    except MolddError as err:
        return handlers.error_body(err)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal_error", path=handlers.COMMAND_PATH, method="POST")
        return 500, handlers.plain_error_body("internal", "internal error; the daemon log has the details")


async def _closing_ctx(app: web.Application) -> AsyncIterator[None]:
    app[CLOSING_KEY] = asyncio.Event()
    yield


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING_KEY].set()


def make_app(
    bus: CommandBus,
    *,
    access: AccessPolicy | None = None,
    settings: ApiSettings | None = None,
    cloudstack: CloudStackEndpoint | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The API application over ``bus``. ``access`` defaults to root and this process's uid only."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=(settings or ApiSettings()).max_body_bytes + 1,
    )
    app[BUS_KEY] = bus
    app[ACCESS_KEY] = access if access is not None else AccessPolicy(None)
    app[SETTINGS_KEY] = settings if settings is not None else ApiSettings()
    app[handlers.VERBS_KEY] = []
    app.cleanup_ctx.append(_closing_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post(handlers.COMMAND_PATH, handlers.async_command)
    app.router.add_get("/v1/events", handlers.async_events)
    app.router.add_get("/v1/health", handlers.async_health)
    if cloudstack is not None:
        add_cloudstack_route(app, cloudstack)  # /client/api, CloudStack's query API
    observe_web.add_routes(app, metrics)  # /metrics, /status, /v1/status, /v1/events/sse (read-only)
    return app
