"""The socket API under abuse: slow and stalled clients are cut, connections are capped, malformed HTTP and the
wrong content type get the JSON error shape, a vanished client is a debug line, the backlog is the configured
one, accept() failures are rate-limited, and group look-ups never block the loop."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from moldd.api import ApiServer, async_serve
from moldd.api.peercred import AccessPolicy, PeerCreds, peer_groups
from moldd.api.protocol import AcceptErrorFilter
from moldd.config import ApiConfig
from moldd.logging import configure_logging
from tests.api.conftest import FakeBus

LIMITS = ApiConfig(header_timeout_s=0.3, body_timeout_s=0.3, max_connections=4, backlog=700)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", json=True, stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture
async def limited(bus: FakeBus, sock_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await async_serve(bus, sock_dir / "moldd.sock", api=LIMITS, use_socket_activation=False)
    yield srv
    await srv.async_close()


async def connect(server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.path is not None
    return await asyncio.open_unix_connection(server.path)


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


async def exchange(server: ApiServer, raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``raw`` and read until the server closes the connection."""
    reader, writer = await connect(server)
    writer.write(raw)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return parse(reply)


async def test_headers_sent_byte_by_byte_are_cut_with_a_json_408(limited: ApiServer) -> None:
    reader, writer = await connect(limited)
    request = b"POST /v1/command HTTP/1.1\r\nHost: moldd\r\nX-Slow: " + b"a" * 10_000
    closed = asyncio.ensure_future(reader.read())
    sent = 0
    for byte in request:  # a byte at a time until the server hangs up
        if closed.done() or writer.transport.is_closing():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.sleep(0.01)
    reply = await asyncio.wait_for(closed, 30)
    assert sent < len(request), "the server never cut the slow client"
    status, headers, body = parse(reply)
    assert status == 408 and headers["content-type"].startswith("application/json")
    assert body["error"]["code"] == "timeout" and body["error"]["field"] == "headers"


async def test_a_stalled_body_is_cut_with_a_json_408(limited: ApiServer) -> None:
    status, headers, body = await exchange(
        limited,
        b"POST /v1/command HTTP/1.1\r\nHost: moldd\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"comm",
    )
    assert status == 408 and headers["content-type"].startswith("application/json")
    assert body["error"] == {
        "code": "timeout",
        "message": "the request body did not arrive within 0.3 s",
        "field": "body",
    }


async def test_idle_keepalive_connection_is_not_cut_by_the_header_timeout(limited: ApiServer) -> None:
    """The header clock starts at a request's first byte, not while a keep-alive connection idles."""
    reader, writer = await connect(limited)
    body = b'{"command": "echo", "args": {"a": 1}}'
    request = (
        b"POST /v1/command HTTP/1.1\r\nHost: moldd\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    for _ in range(2):
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
        idle = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait([idle], timeout=LIMITS.header_timeout_s * 3)
        assert not done, "an idle keep-alive connection was closed by the header timeout"
        idle.cancel()
    writer.close()


async def test_connections_over_the_cap_get_503_and_one_log_line(
    limited: ApiServer, log_stream: io.StringIO
) -> None:
    held = [await connect(limited) for _ in range(LIMITS.max_connections)]
    # each held connection is registered once the server has accepted it: a full request proves it
    for reader, writer in held:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: moldd\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    replies = [await exchange(limited, b"GET /v1/health HTTP/1.1\r\nHost: moldd\r\n\r\n") for _ in range(5)]
    assert {status for status, _, _ in replies} == {503}
    assert all(body["error"]["code"] == "unavailable" for _, _, body in replies)
    lines = [e for e in events(log_stream) if e["event"] == "api_connection_limit_reached"]
    assert len(lines) == 1 and lines[0]["max_connections"] == LIMITS.max_connections
    for _, writer in held:
        writer.close()


BAD_HTTP = [
    b"POST /v1/command HTTP/1.1\r\nHost: m\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /v1/command HTTP/1.1\r\nHost: m\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST /v1/command HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/command HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
]


@pytest.mark.parametrize("raw", BAD_HTTP, ids=["bad-length", "huge-header", "bad-chunk", "cl-and-te", "garbage"])
async def test_aiohttps_own_errors_are_json(limited: ApiServer, raw: bytes, log_stream: io.StringIO) -> None:
    status, headers, body = await exchange(limited, raw)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    assert body["ok"] is False and body["error"]["code"] in ("bad_request", "too_large")
    assert body["error"]["field"] == "http" and body["error"]["message"]
    assert not [e for e in events(log_stream) if e["level"] in ("error", "critical")]


async def test_content_type_is_enforced(limited: ApiServer, bus: FakeBus) -> None:
    body = b'{"command": "echo", "args": {}}'
    for ctype in (b"text/plain", b"application/x-www-form-urlencoded", None):
        header = b"Content-Type: " + ctype + b"\r\n" if ctype else b""
        status, _headers, reply = await exchange(
            limited,
            b"POST /v1/command HTTP/1.1\r\nHost: m\r\nConnection: close\r\n" + header
            + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        )
        assert status == 415 and reply["error"]["field"] == "Content-Type", reply
    assert not bus.calls
    status, _, reply = await exchange(
        limited,
        b"POST /v1/command HTTP/1.1\r\nHost: m\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8"
        b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status == 200 and reply["ok"] is True


async def test_a_client_vanishing_mid_body_is_a_debug_line(limited: ApiServer, log_stream: io.StringIO) -> None:
    _reader, writer = await connect(limited)
    writer.write(
        b"POST /v1/command HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a"
    )
    await writer.drain()
    await asyncio.sleep(0.05)  # let the handler start reading the body (no event to wait on from outside)
    writer.transport.abort()
    # the server notices the loss; wait until it has logged about it
    for _ in range(200):
        if any(e["event"] in ("client_gone", "api_body_timeout") for e in events(log_stream)):
            break
        await asyncio.sleep(0.02)
    logged = events(log_stream)
    assert not [e for e in logged if e["event"] == "internal_error" or e["level"] == "error"], logged
    assert any(e["event"] == "client_gone" and e["level"] == "debug" for e in logged), logged


async def test_listen_backlog_is_the_configured_one(limited: ApiServer) -> None:
    out = subprocess.run(["ss", "-xlnH", "src", str(limited.path)], capture_output=True, text=True).stdout
    fields = out.split()
    assert fields, out
    # ss -x -l: Netid State Recv-Q Send-Q(= the backlog) Local ...
    assert int(fields[3]) == LIMITS.backlog, out


def test_accept_failures_are_logged_once_per_interval(log_stream: io.StringIO) -> None:
    loop = asyncio.new_event_loop()
    try:
        limiter = AcceptErrorFilter(loop)
        limiter.install()
        for _ in range(8400):
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
            )
        limiter.uninstall()
    finally:
        loop.close()
    lines = [e for e in events(log_stream) if e["event"] == "api_accept_failed"]
    assert len(lines) == 1 and "Too many open files" in lines[0]["error"]
    assert limiter.limited.count == 8400


def test_peer_groups_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        groups = peer_groups(a)
    finally:
        a.close()
        b.close()
    assert groups is not None and set(groups) == set(os.getgroups())


async def test_group_lookups_do_not_block_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow NSS (SSSD/LDAP) look-up runs on a thread: the loop keeps running while it hangs, and concurrent
    requests of one peer share one look-up."""
    release = threading.Event()
    calls: list[int] = []

    def slow_user_name(uid: int) -> str:
        calls.append(uid)
        assert release.wait(30), "never released"
        return "someone"

    monkeypatch.setattr("moldd.api.peercred.user_name", slow_user_name)
    policy = AccessPolicy(4242, daemon_uid=0)
    creds = PeerCreds(pid=1, uid=1234, gid=4242)
    lookups = [asyncio.ensure_future(policy.async_actor_for(creds)) for _ in range(5)]
    # Were the look-up made on the loop, the loop would hang in it here and never reach release.set().
    while not calls:
        await asyncio.sleep(0.001)
    release.set()
    actors = await asyncio.gather(*lookups)
    assert {a.user for a in actors} == {"someone"} and calls == [1234]


@pytest.mark.parametrize("bad_id", ["a\x00b", "tab\there", " padded", "\u202egnp.exe", ""])
async def test_command_ids_with_control_characters_are_400(limited: ApiServer, bus: FakeBus, bad_id: str) -> None:
    body = json.dumps({"command": "echo", "args": {}, "id": bad_id}).encode()
    status, _, reply = await exchange(
        limited,
        b"POST /v1/command HTTP/1.1\r\nHost: m\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body,
    )
    assert status == 400 and reply["error"]["field"] == "id", reply
    assert not bus.calls
