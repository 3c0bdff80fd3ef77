"""``/client/api``: CloudStack's HTTP query API over moldd's bus.

Parse (GET query and/or POST form, size-capped) → authenticate (signed request with an API key, or on the
Unix socket the peer's credentials) → rate-limit per key → translate and dispatch (:mod:`.commands`) →
answer in CloudStack's JSON shape. Every failure, whatever its cause, leaves as a CloudStack error object;
nothing reaches the generic error middleware.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from moldd.api.cloudstack import commands
from moldd.api.cloudstack.errors import (
    API_LIMIT_EXCEED,
    CS_INVALID_PARAMETER,
    CS_REQUEST_LIMIT,
    INTERNAL_ERROR,
    MALFORMED_PARAMETER_ERROR,
    PARAM_ERROR,
    UNSUPPORTED_ACTION_ERROR,
    CloudStackError,
    from_moldd,
    unauthorized,
)
from moldd.api.cloudstack.ratelimit import RateLimiter
from moldd.api.cloudstack.signing import SignatureError, check_expiry, signature_matches
from moldd.api.handlers import dumps
from moldd.app.bus import Actor, CommandBus
from moldd.domain.errors import MolddError

log = structlog.get_logger("moldd.cloudstack")

PATH = "/client/api"


class ApiUserLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def secret(self) -> str: ...


class Directory(Protocol):
    """Who holds an API key (``moldd.app.users.UserDirectory``)."""

    def lookup(self, apikey: str) -> ApiUserLike | None: ...


@dataclass
class CloudStackSettings:
    max_request_bytes: int = 65536
    max_expires_ahead_s: float = 3600.0
    require_expires: bool = False
    rate_per_s: float = 20.0
    rate_burst: int = 40
    # Failed signatures per peer (address, or uid on the socket): a key cannot be guessed at line speed.
    fail_rate_per_s: float = 1.0
    fail_burst: int = 20
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


@dataclass
class CloudStackEndpoint:
    """What the handler needs; one per listener (socket or TCP)."""

    bus: CommandBus
    directory: Directory
    settings: CloudStackSettings
    tcp: bool  # a TCP listener: a signed request is the only way in
    limiter: RateLimiter = field(init=False)
    failures: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.settings.rate_per_s, self.settings.rate_burst)
        self.failures = RateLimiter(self.settings.fail_rate_per_s, self.settings.fail_burst)

    async def async_handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        key = "errorresponse"
        command = None
        try:
            params = await _async_params(request, self.settings.max_request_bytes)
            lower: dict[str, str] = {}
            for name, value in params.items():
                lower.setdefault(name.lower(), value)
            command = lower.get("command")
            if command:
                key = f"{command.lower()}response"
            response_format = (lower.get("response") or "json").lower()
            actor = self._authenticate(request, params, lower)
            if response_format != "json":
                raise CloudStackError(PARAM_ERROR, "moldd answers response=json only", CS_INVALID_PARAMETER)
            if not command:
                raise CloudStackError(PARAM_ERROR, "missing parameter command", CS_INVALID_PARAMETER)
            spec = commands.COMMANDS.get(command.lower())
            if spec is None:
                raise CloudStackError(
                    UNSUPPORTED_ACTION_ERROR,
                    "The given command does not exist or it is not available for user",
                )
            call = commands.Call(self.bus, actor, spec.name, lower)
            body = await spec.handler(call)
        except CloudStackError as err:
            return self._error(key, err, command, request)
        except MolddError as err:
            return self._error(key, from_moldd(err), command, request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cloudstack_internal_error", command=command)
            internal = CloudStackError(INTERNAL_ERROR, "internal error; the daemon log has the details")
            return self._error(key, internal, command, request)
        log.debug("cloudstack_command", command=command, ms=round((time.perf_counter() - started) * 1000, 3))
        return _json(key, body, 200)

    def _error(self, key: str, err: CloudStackError, command: str | None, request: web.Request) -> web.Response:
        log.info("cloudstack_refused", command=command, errorcode=err.errorcode, reason=err.text[:200],
                 peer=_peer(request))  # fmt: skip
        return _json(key, err.body(), err.errorcode)

    def _authenticate(self, request: web.Request, params: dict[str, str], lower: dict[str, str]) -> Actor:
        apikey, signature = lower.get("apikey"), lower.get("signature")
        if apikey is None and signature is None and not self.tcp:
            from moldd.api.keys import ACTOR_KEY

            peer = request.get(ACTOR_KEY)  # set by the socket's identity middleware
            if peer is not None:
                if not self.limiter.allow(f"uid:{peer.uid}"):
                    raise _limited()
                return peer
        peer = _peer(request)
        if apikey is None or signature is None:
            log.warning("cloudstack_unauthenticated", reason="missing apiKey or signature", peer=peer)
            raise unauthorized()
        if self.failures.exhausted(f"peer:{peer}"):
            log.warning("cloudstack_failures_limited", peer=peer)
            raise _limited()
        user = self.directory.lookup(apikey)
        if user is None or not signature_matches(params, user.secret, signature):
            self.failures.allow(f"peer:{peer}")
            log.warning("cloudstack_bad_signature", peer=peer, known_key=user is not None,
                        user=user.name if user else None)  # fmt: skip
            raise unauthorized()
        try:
            check_expiry(params, self.settings.clock(),
                         max_ahead=timedelta(seconds=self.settings.max_expires_ahead_s),
                         require=self.settings.require_expires)  # fmt: skip
        except SignatureError as exc:
            log.warning("cloudstack_expired", peer=peer, user=user.name, reason=str(exc))
            raise unauthorized() from None
        if not self.limiter.allow(f"key:{apikey}"):
            raise _limited()
        return Actor(user=user.name, role=user.role, via="apikey")


def _limited() -> CloudStackError:
    return CloudStackError(API_LIMIT_EXCEED, "too many requests: slow down and retry", CS_REQUEST_LIMIT)


def _peer(request: web.Request) -> str:
    from moldd.api.keys import ACTOR_KEY

    actor = request.get(ACTOR_KEY)
    if actor is not None:
        return f"uid={actor.uid}"
    return str(request.remote or "unix")


def _json(key: str, body: object, status: int) -> web.Response:
    return web.Response(body=dumps({key: body}), status=status, content_type="application/json")


async def _async_params(request: web.Request, max_bytes: int) -> dict[str, str]:
    """The request's parameters, query string and form body together (first value of a name wins, as in
    CloudStack). Everything oversized or undecodable is a CloudStack parameter error."""
    raw_query = request.rel_url.raw_query_string
    if len(raw_query) > max_bytes:
        raise CloudStackError(MALFORMED_PARAMETER_ERROR, f"the query string is larger than {max_bytes} bytes")
    body = b""
    if request.method == "POST":
        ctype = request.content_type
        if request.content_length is not None and request.content_length > max_bytes:
            raise CloudStackError(MALFORMED_PARAMETER_ERROR, f"the request body is larger than {max_bytes} bytes")
        if ctype not in ("application/x-www-form-urlencoded", "application/octet-stream", ""):
            raise CloudStackError(
                MALFORMED_PARAMETER_ERROR, f"send parameters in the query or as a form, not {ctype[:60]}"
            )
        buf = bytearray()
        while len(buf) <= max_bytes:
            chunk = await request.content.read(max_bytes + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
        if len(buf) > max_bytes:
            raise CloudStackError(MALFORMED_PARAMETER_ERROR, f"the request body is larger than {max_bytes} bytes")
        body = bytes(buf)
    elif request.method != "GET":
        raise CloudStackError(MALFORMED_PARAMETER_ERROR, f"method {request.method} is not supported: GET or POST")
    params: dict[str, str] = {}
    try:
        for source in (raw_query, body.decode("utf-8")):
            for name, value in parse_qsl(source, keep_blank_values=True, errors="strict"):
                if not name or len(params) > 1000:
                    raise ValueError("empty parameter name or too many parameters")
                if "\x00" in name or "\x00" in value:
                    raise ValueError("NUL in a parameter")
                params.setdefault(name, value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CloudStackError(MALFORMED_PARAMETER_ERROR, f"malformed parameters: {str(exc)[:120]}") from None
    return params


def add_route(app: web.Application, endpoint: CloudStackEndpoint) -> None:
    # Every method reaches the handler, so even a PUT is answered with a CloudStack-shaped error.
    app.router.add_route("*", PATH, endpoint.async_handle)
