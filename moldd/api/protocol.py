"""The connection level of the socket API: bounded in time and in number, and every reply in the JSON shape.

aiohttp's :class:`~aiohttp.web_protocol.RequestHandler` is subclassed (``handle_error`` and the data path) so that

* errors aiohttp raises itself (bad Content-Length, oversized headers, bad chunking, Content-Length together with
  Transfer-Encoding) leave as ``{"ok": false, "error": {...}}`` with ``application/json``, not text/plain;
* a request's line and headers must arrive within ``header_timeout_s`` of its first byte, and its body within
  ``body_timeout_s`` of the headers (a client sending a byte at a time is cut, with a JSON 408);
* at most ``max_connections`` connections are served at once; more are answered 503 and closed, with one
  log line per interval saying how many were turned away;
* ``socket.accept()`` failures (file descriptors exhausted) are logged at most once per interval with a count.

The fast lane: a connection answers the usual ``POST /v1/command`` itself, below aiohttp's request handling.
When aiohttp's handler loop is idle (nothing queued, no request in progress) and a complete request arrives
(HTTP/1.1 keep-alive, ``Content-Type: application/json``, a Content-Length body within the limit, no
``Expect``/upgrade), the command is run at once from ``data_received`` (:func:`moldd.api.app.async_answer_command`,
the same code and bytes as the routed ``async_command`` behind ``error_middleware``) and its reply written in one
``write``. A read completes without suspending, so it costs no task, no ``Request``/``Response`` object and no
extra turn of the loop (about half the CPU of a request through aiohttp). A command that does suspend (a write, a
connection's first request while its peer's identity is looked up) continues as a task in the same context;
until it has answered, the connection's further input is held, so replies keep the order of the requests.
Anything else (other paths, HTTP/1.0, ``Connection: close``, chunked or partial bodies, another content type)
goes to aiohttp as before.

Private aiohttp API used: ``Server._kwargs`` (the handler's keyword arguments), ``RequestHandler._messages``,
``_request_count``, ``transport``, ``_waiter``, ``_parser.message_consumed()``, the keep-alive fields
(``_keepalive``, ``_keepalive_handle``, ``_next_keepalive_close_time``, ``_keepalive_timeout``,
``_process_keepalive``) and the read-buffer pause (``_buffer_paused``, ``_msg_queue_resume_size``,
``_resume_reading_if_drained``); pinned by the tests in ``tests/api/test_api_limits.py`` and
``tests/api/test_api_lane.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeGuard

import structlog
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES

from moldd.api.handlers import COMMAND_PATH, JSON, dumps, json_response
from moldd.config import ApiConfig
from moldd.domain.errors import MolddError, present

log = structlog.get_logger("moldd.api")

LOG_INTERVAL_S = 10.0


class RequestTimeout(MolddError):
    code = "timeout"
    http_status = 408


class RateLimitedLog:
    """One log line per ``interval_s`` for a repeating condition, carrying how often it happened since."""

    def __init__(self, event: str, interval_s: float = LOG_INTERVAL_S, *, level: str = "warning") -> None:
        self.event, self.interval_s, self.level = event, interval_s, level
        self.count = 0
        self.suppressed = 0
        self._last = -float("inf")

    def __call__(self, **fields: Any) -> bool:
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        self._last = now
        getattr(log, self.level)(self.event, **fields, suppressed_since_last=self.suppressed)
        self.suppressed = 0
        return True


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large", 503: "Service Unavailable"}


def raw_json_reply(status: int, code: str, message: str, field: str | None) -> bytes:
    """A whole HTTP/1.1 response (``Connection: close``) for replying below aiohttp's request handling."""
    body = dumps({"ok": False, "error": {"code": code, "message": message, "field": field}})
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


Lane = Callable[[Any, bytes], Coroutine[Any, Any, tuple[int, bytes]]]
"""``async (connection, raw body) -> (status, encoded JSON body)``: the fast lane's command answer."""

_HEADS: dict[int, bytes] = {}
_TAIL: list[Any] = [None, b""]  # [the Date string it was built for, b"\r\nDate: ...\r\nServer: ...\r\n\r\n"]
_LARGE = 1 << 16  # bodies past this are handed to the transport beside their head, not copied behind it


def reply_head(status: int, length: int) -> bytes:
    """The head aiohttp writes for ``web.Response(body=..., status=status, content_type=JSON)`` answering a
    keep-alive HTTP/1.1 request (same headers, same order)."""
    head = _HEADS.get(status)
    if head is None:
        head = _HEADS[status] = (
            f"HTTP/1.1 {status} {REASON_PHRASES.get(status, '')}\r\nContent-Type: {JSON}\r\nContent-Length: "
        ).encode("ascii")
    date = rfc822_formatted_time()  # aiohttp's, kept for the second
    if date is not _TAIL[0]:
        _TAIL[:] = [date, f"\r\nDate: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode("ascii")]
    tail: bytes = _TAIL[1]
    return head + str(length).encode("ascii") + tail


SEND_BUFFER_MAX = 4 << 20
"""A large reply's socket send buffer is widened up to this (within the kernel's ``net.core.wmem_max``): the
kernel then takes a 9 MiB list in a few writes instead of ~45 rounds of 200 KiB, each waiting for the client to
read. Only data in flight is charged: an idle connection holds nothing."""


def _widen_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    want = min(size, SEND_BUFFER_MAX)
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < want:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want // 2)  # Linux doubles what it is given
    except OSError:
        pass  # best effort: the reply goes out either way


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], step: Any) -> Generator[Any, Any, Any]:
    """The rest of ``coro`` after its first ``send(None)`` yielded ``step``, for a Task to drive (what
    ``yield from`` does, started one step in)."""
    while True:
        try:
            sent = yield step
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown into the task (a cancellation): into the coroutine
            try:
                step = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                step = coro.send(sent)
            except StopIteration as done:
                return done.value


class JsonRequestHandler(RequestHandler):
    """One API connection (see the module docstring)."""

    def __init__(
        self, manager: Any, *, limits: ApiConfig, lane: Lane | None = None, max_body_bytes: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._lane = lane
        self._lane_max = max_body_bytes
        self._lane_task: asyncio.Task[tuple[int, bytes]] | None = None
        self._held: list[bytes] = []  # input that came while a lane command was still running
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._cut = False  # timed out: the reply is sent, input is discarded until the connection closes
        self.lost = asyncio.Event()  # set when the connection is gone (a long-lived handler can stop at once)
        # (access policy, valid until, Actor) of the peer: see moldd.api.app.async_identify
        self.identity: tuple[Any, float, Any] | None = None

    # -- timeouts -------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._cut:
            return
        if self._lane_task is not None:
            if data:
                self._held.append(data)  # answered after the lane's command, in order
            return
        # The header clock starts at a request's first byte. A request that arrives whole in one read (the
        # usual case) needs no timer at all; one whose head is still incomplete after this read gets it now.
        starts = self._header_timer is None and self._body is None and bool(data)
        before = self._request_count
        waiter = self._waiter
        lane = self._lane is not None and waiter is not None and not waiter.done() and not self._messages
        if lane:
            self._waiter = None  # parse without waking aiohttp's handler loop: the lane may answer it all
        try:
            super().data_received(data)
        finally:
            if lane:
                self._waiter = waiter
                if (self._force_close or self._close) and waiter is not None and not waiter.done():
                    waiter.cancel()
        if self._request_count > before:
            self._cancel_header_timer()
            payload = self._messages[-1][1] if self._messages else EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                self._body = payload
                self._body_timer = asyncio.get_running_loop().call_later(
                    self._limits.body_timeout_s, self._on_body_timeout
                )
        elif starts and not self._cut:
            self._header_timer = asyncio.get_running_loop().call_later(
                self._limits.header_timeout_s, self._on_header_timeout
            )
        if self._body is not None and self._body.is_eof():
            self._cancel_body_timer()
        if lane and self._messages:
            self._serve_lane()

    # -- the fast lane (module docstring) ----------------------------------------------------------------------
    def _lane_takes(self, message: Any, payload: Any) -> bool:
        if not (
            type(message) is RawRequestMessage
            and message.method == "POST"
            and message.path == COMMAND_PATH
            and message.version == HttpVersion11
            and not message.should_close
            and not message.upgrade
            and not message.chunked
            and payload.is_eof()
            and payload.exception() is None
        ):
            return False
        headers = message.headers
        length = headers.get("Content-Length")
        return (
            headers.get("Content-Type") == JSON
            and "Expect" not in headers
            and length is not None
            and length.isascii()
            and length.isdigit()
            and 0 < int(length) <= self._lane_max
        )

    def _serve_lane(self) -> None:
        """Answer the queued requests the lane takes, in order; wake aiohttp's loop for the first it does not."""
        messages = self._messages
        lane = self._lane
        while (
            messages
            and lane is not None
            and self._lane_task is None
            and not self._paused
            and not self._force_close
            and not self._close
            and self.transport is not None
        ):
            message, payload = messages[0]
            if not self._lane_takes(message, payload):
                break
            messages.popleft()
            if self._parser is not None:
                self._parser.message_consumed()
            self._lane_run(lane(self, payload.read_nowait(-1)))
        if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
            self._resume_reading_if_drained()
        if messages and self._lane_task is None:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _lane_run(self, coro: Coroutine[Any, Any, tuple[int, bytes]]) -> None:
        context = contextvars.copy_context()  # what the command binds (log context) stays with it
        try:
            step = context.run(coro.send, None)
        except StopIteration as done:
            self._lane_reply(*done.value)
            return
        except Exception:
            log.exception("api_lane_failed")
            self.force_close()
            return
        # It suspended (a write, a first identity look-up): the rest runs as a task; input waits for it.
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        task: asyncio.Task[tuple[int, bytes]] = self._loop.create_task(_resume(coro, step), context=context)
        self._lane_task = task
        task.add_done_callback(self._lane_done)

    def _lane_done(self, task: asyncio.Task[tuple[int, bytes]]) -> None:
        self._lane_task = None
        if task.cancelled():
            self.force_close()
            return
        exc = task.exception()
        if exc is not None:
            log.error("api_lane_failed", error=repr(exc))
            self.force_close()
            return
        self._lane_reply(*task.result())
        if self._messages:
            self._serve_lane()
        if self._lane_task is None and self._held:
            held, self._held = b"".join(self._held), []
            self.data_received(held)

    def _lane_reply(self, status: int, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client went away: nothing to tell it
        head = reply_head(status, len(body))
        if len(body) > _LARGE:
            _widen_send_buffer(transport, len(body))
            transport.writelines((head, body))
        else:
            transport.write(head + body)
        if self._manager is not None:
            self._manager.requests_count += 1
        # as aiohttp's loop does after a keep-alive reply: the idle clock restarts
        self._keepalive = True
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        log.info("api_header_timeout", timeout_s=self._limits.header_timeout_s)
        transport = self.transport
        self._cut = True
        if transport is not None and not transport.is_closing():
            transport.write(
                raw_json_reply(
                    408,
                    "timeout",
                    f"the request line and headers did not arrive within {self._limits.header_timeout_s:g} s",
                    "headers",
                )
            )
            # Shut the write side and drop what still comes for a moment: closing with unread input would
            # reset the connection before the client reads the reply.
            if _is_stream(transport) and transport.can_write_eof():
                transport.write_eof()
                asyncio.get_running_loop().call_later(1.0, self.force_close)
                return
        self.force_close()

    def _on_body_timeout(self) -> None:
        body, self._body_timer = self._body, None
        self._body = None
        if body is not None and not body.is_eof():
            log.info("api_body_timeout", timeout_s=self._limits.body_timeout_s)
            body.set_exception(
                RequestTimeout(
                    f"the request body did not arrive within {self._limits.body_timeout_s:g} s", field="body"
                )
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set()
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    # -- aiohttp's own errors --------------------------------------------------------------------------------
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed HTTP (aiohttp's parser refused it): a JSON error and a closed connection; a debug line,
        since it says something about the client, not the daemon."""
        if status >= 500:
            log.error("api_protocol_error", status=status, error=repr(exc))
        else:
            log.debug("api_bad_http", status=status, error=repr(exc))
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        reason = message or (str(exc) if exc else "bad request")
        code = {413: "too_large", 431: "too_large"}.get(status, "bad_request" if status < 500 else "internal")
        resp = json_response(
            {"ok": False, "error": {"code": code, "message": f"malformed HTTP request: {reason}", "field": "http"}},
            status=status,
        )
        resp.force_close()
        return resp


def _is_stream(transport: asyncio.BaseTransport) -> TypeGuard[asyncio.Transport]:
    """A stream transport, whether asyncio's or uvloop's (whose classes are not ``asyncio.Transport``)."""
    return isinstance(transport, asyncio.Transport) or (
        hasattr(transport, "write") and hasattr(transport, "can_write_eof")
    )


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: one JSON 503, then the write side is shut and what the client
    still sends is discarded until it closes (closing with its request unread would reset the connection before
    the client reads the reply), for at most a second."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _is_stream(transport):
            raise TypeError(f"a stream transport is needed, not {type(transport).__name__}")
        self.transport = transport
        transport.write(
            raw_json_reply(
                503,
                "unavailable",
                f"moldd is serving its maximum of {self.limit} connections; retry shortly",
                None,
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close


def protocol_factory(
    server: web.Server, limits: ApiConfig, lane: Lane | None = None, max_body_bytes: int = 0
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory for the listening socket: a :class:`JsonRequestHandler` while under the cap."""
    loop = asyncio.get_running_loop()
    full = RateLimitedLog("api_connection_limit_reached")

    def make() -> asyncio.Protocol:
        if len(server._connections) >= limits.max_connections:
            full(max_connections=limits.max_connections, refused_total=full.count + 1)
            return _Refused(limits.max_connections)
        return JsonRequestHandler(
            server, loop=loop, limits=limits, lane=lane, max_body_bytes=max_body_bytes, **server._kwargs
        )

    return make


class LimitedSite(web.SockSite):
    """A :class:`web.SockSite` serving with :func:`protocol_factory` and the configured backlog."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: Any,
        limits: ApiConfig,
        lane: Lane | None = None,
        max_body_bytes: int = 0,
    ) -> None:
        super().__init__(runner, sock, backlog=limits.backlog)
        self._limits = limits
        self._lane = lane
        self._lane_max = max_body_bytes

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = present(self._runner.server, "the aiohttp server of the runner")
        self._server = await loop.create_server(
            protocol_factory(server, self._limits, self._lane, self._lane_max), sock=self._sock, backlog=self._backlog
        )


class AcceptErrorFilter:
    """A loop exception handler that rate-limits ``socket.accept() out of system resource`` (the loop retries
    accepting every second and would log each time); everything else goes to the previous handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.limited = RateLimitedLog("api_accept_failed", level="error")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept()"):
            exc = context.get("exception")
            self.limited(error=repr(exc), hint="file descriptors exhausted? see LimitNOFILE and api.max_connections")
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def install(self) -> None:
        self.loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)
