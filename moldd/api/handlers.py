"""HTTP ⇄ bus translation. No business rule lives here: the bus decides, these only carry."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web

from moldd.api.envelope import parse_command, parse_events_query
from moldd.api.keys import ACTOR_KEY, BUS_KEY, CLOSING_KEY, SETTINGS_KEY
from moldd.domain.errors import (
    CapacityError,
    Conflict,
    InvalidState,
    MolddError,
    NotFound,
    OperationFailed,
    PermissionDenied,
    Unavailable,
    ValidationError,
)

log = structlog.get_logger("moldd.api")

JSON = "application/json"
COMMAND_PATH = "/v1/command"
NDJSON = "application/x-ndjson"


# Replies are encoded by orjson (~5x the stdlib encoder on a 200-VM list), and a read-model view
# (``moldd.projection.model.View``: anything with ``encoded_json()``) is spliced in from the encoding
# it caches until its object changes. default=str: a datetime or Path slipping into a result should not
# turn a success into a 500 (orjson itself writes datetimes, UUIDs and dataclasses). What orjson
# refuses (non-string keys: OPT_NON_STR_KEYS would cost +50 % on every reply; integers beyond 64 bits;
# nesting deeper than 254) goes to the stdlib encoder, which writes such keys as strings.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
# Subclasses of dict/list/str/int come to _default (so views are recognised); they leave as what the
# stdlib encoder writes for them.
_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS


class UnsupportedMediaType(ValidationError):
    code = "unsupported_media_type"
    http_status = 415


def _default(value: Any) -> Any:
    encoded = getattr(value, "encoded_json", None)
    if encoded is not None:
        return encoded()  # an orjson.Fragment
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    return str(value)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value).encode()


def loads(raw: bytes) -> Any:
    """Parse a request body (UTF-8 JSON); raises ``ValueError`` (``orjson.JSONDecodeError``) when it is not.
    Integers beyond 64 bits arrive as floats, which the verbs' integer checks refuse."""
    return orjson.loads(raw)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(payload), status=status, content_type=JSON)


# The HTTP status of each domain error class (the domain knows no HTTP). An error class of the API layer sets
# ``http_status`` itself (UnsupportedMediaType, RequestTimeout); subclasses inherit their nearest base's status.
HTTP_STATUS: dict[type[MolddError], int] = {
    ValidationError: 400,
    PermissionDenied: 403,
    NotFound: 404,
    InvalidState: 409,
    Conflict: 409,
    CapacityError: 409,
    OperationFailed: 502,
    Unavailable: 503,
    MolddError: 500,
}


def http_status(err: MolddError) -> int:
    """The HTTP status for ``err``: the nearest class in its MRO with an ``http_status`` of its own or in
    ``HTTP_STATUS``; 500 for anything else."""
    for cls in type(err).__mro__:
        own = cls.__dict__.get("http_status")
        if isinstance(own, int):
            return own
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_response(err: MolddError) -> web.Response:
    return json_response({"ok": False, "error": err.to_dict()}, status=http_status(err))


def error_body(err: MolddError) -> tuple[int, bytes]:
    """The status and encoded body of :func:`error_response`."""
    return http_status(err), dumps({"ok": False, "error": err.to_dict()})


def plain_error_body(code: str, message: str, field: str | None = None) -> bytes:
    return dumps({"ok": False, "error": {"code": code, "message": message, "field": field}})


def plain_error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return web.Response(body=plain_error_body(code, message, field), status=status, content_type=JSON)


async def _read_body(request: web.Request) -> bytes:
    """The whole request body, at most ``max_body_bytes`` (a ValidationError past it)."""
    max_bytes = request.app[SETTINGS_KEY].max_body_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise ValidationError(f"the request body is larger than {max_bytes} bytes", field="body")
    content = request.content
    if content.is_eof():  # the whole body came with the request (the usual case): take it without waiting
        return content.read_nowait(max_bytes + 1)
    # read(n) returns what has arrived (at least one byte), not n bytes: loop to the end of the body.
    raw = bytearray()
    while len(raw) <= max_bytes:
        chunk = await content.read(max_bytes + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)


def parse_body(raw: bytes, max_bytes: int) -> Any:
    """The decoded JSON of a request body, or a ValidationError naming ``body``."""
    if len(raw) > max_bytes:
        raise ValidationError(f"the request body is larger than {max_bytes} bytes", field="body")
    if not raw:
        raise ValidationError("the request body is empty; send a JSON object", field="body")
    try:
        return loads(raw)
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}", field="body") from None


def _verbs(app: web.Application, bus: Any) -> frozenset[str]:
    """The bus's verbs, asked once per application (they are fixed when the bus is built)."""
    kept = app.get(VERBS_KEY)
    if kept is None:
        return frozenset(bus.verbs())
    if not kept or kept[0] is not bus:
        kept[:] = [bus, frozenset(bus.verbs())]
    verbs: frozenset[str] = kept[1]
    return verbs


VERBS_KEY = web.AppKey("moldd.verbs", list)  # [bus, its verbs], filled by the first command


def _debug_enabled() -> bool:
    """Whether a debug line would be written (the level ``configure_logging`` set; without it, structlog's
    default writes everything). The per-command debug line is built only then: its fields cost on every call."""
    root = logging.getLogger()
    return not root.handlers or root.isEnabledFor(logging.DEBUG)


async def async_command(request: web.Request) -> web.Response:
    """``POST /v1/command`` through aiohttp's routing (behind ``error_middleware``). The daemon's connections
    answer the usual request (HTTP/1.1, whole body in, ``Content-Type: application/json``) in their fast lane
    (:class:`moldd.api.protocol.JsonRequestHandler`) instead, with the same bytes (both call
    :func:`async_run_command`)."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(
            f"the request body must be sent as Content-Type: {JSON}, not {request.content_type or 'none'}",
            field="Content-Type",
        )
    raw = await _read_body(request)
    return web.Response(body=await async_run_command(request.app, request[ACTOR_KEY], raw), content_type=JSON)


async def async_run_command(app: web.Application, actor: Any, raw: bytes) -> bytes:
    """One command from its raw JSON body to the encoded success reply; refusals raise ``MolddError``."""
    bus = app[BUS_KEY]
    envelope = parse_command(parse_body(raw, app[SETTINGS_KEY].max_body_bytes), _verbs(app, bus))
    started = time.perf_counter()
    try:
        reply = await bus.async_dispatch(envelope.verb, envelope.args, envelope.command_id, actor)
    except MolddError as err:
        log.info(
            "command_refused", verb=envelope.verb, command_id=envelope.command_id, actor=str(actor),
            code=err.code, field=err.field,
        )  # fmt: skip
        raise
    if _debug_enabled():
        log.debug(
            "command", verb=envelope.verb, command_id=envelope.command_id, actor=str(actor),
            position=reply.position, ms=round((time.perf_counter() - started) * 1000, 3),
        )  # fmt: skip
    return dumps({"ok": True, "result": reply.result, "position": reply.position})


async def async_health(request: web.Request) -> web.Response:
    """``GET /v1/health``: 200 when the bus says ok, else 503 (what a load balancer or probe wants)."""
    try:
        health = dict(request.app[BUS_KEY].health())
    except Exception as exc:
        log.exception("health_check_failed")
        health = {"ok": False, "error": f"health check raised {type(exc).__name__}"}
    return json_response(health, status=200 if health.get("ok") else 503)


async def async_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events``: log entries as NDJSON, live, with a heartbeat line when idle.

    Each line is one JSON object: a log entry, or ``{"heartbeat": <unix time>}`` sent every
    ``heartbeat_s`` while nothing matches, so a client notices a dead connection. The stream ends
    when the client goes away or the daemon shuts down.
    """
    query = parse_events_query(request.query)
    settings = request.app[SETTINGS_KEY]
    closing = request.app[CLOSING_KEY]
    bus = request.app[BUS_KEY]
    pages = getattr(bus, "async_follow_pages", None)
    entries: AsyncIterator[Any] = (
        pages(query.from_position, stream=query.stream, correlation=query.correlation)
        if pages is not None
        else bus.async_follow(query.from_position, stream=query.stream, correlation=query.correlation)
    )

    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    _FOLLOWERS[0] += 1
    try:
        lost = getattr(request.protocol, "lost", None)
        await _async_pump(
            entries, response, query.matches, settings.heartbeat_s, closing, settings.write_timeout_s, lost
        )
    except (ConnectionResetError, ConnectionError):
        pass  # the client left; nothing to tell it
    except _StalledClient:
        log.info("event_stream_client_stalled", timeout_s=settings.write_timeout_s)
        if request.transport is not None:
            request.transport.abort()  # what it has not read cannot be delivered anyway
    finally:
        aclose = getattr(entries, "aclose", None)
        if aclose is not None:
            await aclose()
        _FOLLOWERS[0] -= 1
        if _FOLLOWERS[0] == 0:
            await asyncio.to_thread(release_memory)
    if not request.transport or request.transport.is_closing():
        return response
    try:
        await response.write_eof()
    except ConnectionError:
        pass
    return response


_FOLLOWERS = [0]  # open event streams in this process


def release_memory() -> None:
    """Give freed heap back to the system once the last follower has gone (glibc keeps it otherwise, and RSS
    would stay at the peak of a burst of followers)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim(0)


class _StalledClient(Exception):
    """The client of an event stream took no data for ``write_timeout_s``."""


async def _async_write(response: web.StreamResponse, data: bytes, timeout: float) -> None:
    try:
        await asyncio.wait_for(response.write(data), timeout)
    except TimeoutError:
        raise _StalledClient from None


async def _async_pump(
    entries: AsyncIterator[Any],
    response: web.StreamResponse,
    matches: Callable[[Mapping[str, Any]], bool],
    heartbeat_s: float,
    closing: asyncio.Event,
    write_timeout_s: float = 30.0,
    lost: asyncio.Event | None = None,
) -> None:
    closing_wait = asyncio.ensure_future(closing.wait())
    lost_wait = asyncio.ensure_future(lost.wait()) if lost is not None else None
    next_entry: asyncio.Future[dict[str, Any]] | None = None
    last_write = time.monotonic()
    try:
        while not closing.is_set():
            if next_entry is None:
                next_entry = asyncio.ensure_future(anext(entries))
            timeout = max(0.0, last_write + heartbeat_s - time.monotonic())
            waiters: set[asyncio.Future[Any]] = {next_entry, closing_wait}
            if lost_wait is not None:
                waiters.add(lost_wait)
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if lost_wait is not None and lost_wait in done:
                return  # the client went away: stop now, not at the next heartbeat
            if next_entry in done:
                fut, next_entry = next_entry, None
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    return
                # an entry, or a page of entries (one write for the page)
                lines = [dumps(e) for e in (item if isinstance(item, list) else [item]) if matches(e)]
                if lines:
                    await _async_write(response, b"\n".join(lines) + b"\n", write_timeout_s)
                    last_write = time.monotonic()
            # Filtered-out traffic does not count as life: the client saw nothing.
            if time.monotonic() - last_write >= heartbeat_s:
                await _async_write(
                    response, dumps({"heartbeat": round(time.time(), 3)}) + b"\n", write_timeout_s
                )
                last_write = time.monotonic()
    finally:
        closing_wait.cancel()
        if lost_wait is not None:
            lost_wait.cancel()
        if next_entry is not None:
            next_entry.cancel()
            try:
                await next_entry
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
            except Exception:
                log.exception("event_follow_failed")
