"""The connections' fast lane for ``POST /v1/command`` (moldd.api.protocol): the same bytes as aiohttp's routed
path for every kind of answer, replies in request order when a command suspends (pipelined and held input),
idle keep-alive connections still closed, a client leaving mid-command harmless, and a command's log context
kept to itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from moldd.api import ApiServer, async_serve
from moldd.api import protocol as api_protocol
from moldd.config import ApiConfig
from tests.api.conftest import FakeBus

LANE_TYPE = b"application/json"
ROUTED_TYPE = b"application/json; charset=utf-8"  # accepted by the routed handler, not taken by the lane


def request(body: Any, content_type: bytes = LANE_TYPE, extra: bytes = b"") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        b"POST /v1/command HTTP/1.1\r\nHost: moldd\r\nContent-Type: " + content_type + b"\r\n" + extra
        + b"Content-Length: %d\r\n\r\n" % len(raw) + raw
    )  # fmt: skip


async def read_reply(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head without its Date line, body) of one reply."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if head.startswith(b"HTTP/1.1 100 "):  # an interim reply (Expect: 100-continue)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return b"\r\n".join(line for line in lines if not line.startswith(b"Date: ")), body


class Counted:
    """Counts the replies the lane writes itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = api_protocol.reply_head

        def counting(status: int, length: int) -> bytes:
            self.n += 1
            return real(status, length)

        monkeypatch.setattr(api_protocol, "reply_head", counting)


@pytest.fixture
async def lane_server(bus: FakeBus, sock_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await async_serve(
        bus, sock_dir / "moldd.sock", api=ApiConfig(idle_timeout_s=0.5), use_socket_activation=False
    )
    yield srv
    await srv.async_close()


async def connect(server: ApiServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.path is not None
    return await asyncio.open_unix_connection(server.path, limit=1 << 22)


BODIES: list[Any] = [
    {"command": "echo", "args": {"x": 1}},
    {"command": "listVirtualMachines", "args": {"group": "web"}},
    {"command": "listVirtualMachines", "args": {"group": "big"}},  # a reply past the lane's one-write size
    {"command": "listVirtualMachine"},  # unknown verb (with a suggestion)
    {"command": "echo", "args": [1]},  # a refusal naming a field
    {"command": "explode"},  # 500, details only in the log
    {"command": "queryAsyncJobResult", "args": {"jobid": "nope"}},  # the bus's NotFound
    {"command": "echo", "id": "bad\u202eid"},
    b"{not json",
    b"[1, 2]",
    b'"\xff"',  # not UTF-8
]


async def test_lane_and_routed_path_answer_the_same_bytes(
    lane_server: ApiServer, bus: FakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2000):
        bus.vms[f"big-{i}"] = {"name": f"big-{i}", "display_name": "é" * 40, "state": "Stopped", "group": "big"}
    counted = Counted(monkeypatch)
    reader, writer = await connect(lane_server)
    try:
        for body in BODIES:
            writer.write(request(body, LANE_TYPE))
            lane = await read_reply(reader)
            writer.write(request(body, ROUTED_TYPE))
            routed = await read_reply(reader)
            assert lane == routed, body
            assert lane[0].startswith(b"HTTP/1.1 ")
            if body == BODIES[2]:
                assert len(lane[1]) > 4 * api_protocol._LARGE
    finally:
        writer.close()
    assert counted.n == len(BODIES), "every lane-shaped request was answered by the lane"


async def test_requests_the_lane_does_not_take_go_through_aiohttp(
    lane_server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(monkeypatch)
    reader, writer = await connect(lane_server)
    body = json.dumps({"command": "echo", "args": {"n": 1}}).encode()
    try:
        for raw in [
            request(body, ROUTED_TYPE),
            request(body, b"text/plain"),  # 415 from the routed handler
            request(body, extra=b"Expect: 100-continue\r\n"),
            b"POST /v1/command?x=1 HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
            b"POST /v1/command HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
        ]:
            writer.write(raw)
            head, reply = await read_reply(reader)
            assert head.split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 415 Unsupported Media Type"), head
            assert json.loads(reply)["ok"] == head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert counted.n == 0


async def test_http10_and_connection_close_keep_their_connection_headers(lane_server: ApiServer) -> None:
    body = json.dumps({"command": "echo"}).encode()
    for version, extra, expect in [
        (b"HTTP/1.1", b"Connection: close\r\n", b"Connection: close"),
        (b"HTTP/1.0", b"Connection: keep-alive\r\n", b"Connection: keep-alive"),
    ]:
        reader, writer = await connect(lane_server)
        writer.write(
            b"POST /v1/command " + version + b"\r\nHost: m\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip
        head, _ = await read_reply(reader)
        assert expect in head.split(b"\r\n"), head
        writer.close()


async def test_pipelined_and_held_requests_are_answered_in_order_around_a_suspended_command(
    lane_server: ApiServer, bus: FakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that suspends (slowEcho waits for the test) holds the connection's later requests, whether they
    came in the same write (queued) or after it (held), through the lane or the routed path; all are answered
    in order once it finishes."""
    counted = Counted(monkeypatch)
    reader, writer = await connect(lane_server)
    try:
        writer.write(request({"command": "echo", "args": {"n": 0}}))  # the first: identity looked up
        assert json.loads((await read_reply(reader))[1])["result"]["args"] == {"n": 0}
        writer.write(
            request({"command": "slowEcho", "args": {"n": 1}})
            + request({"command": "echo", "args": {"n": 2}})
            + request({"command": "echo", "args": {"n": 3}}, ROUTED_TYPE)
            + request({"command": "echo", "args": {"n": 4}})
        )
        await writer.drain()
        while not any(c.verb == "slowEcho" for c in bus.calls):
            await asyncio.sleep(0.01)
        writer.write(request({"command": "echo", "args": {"n": 5}}) + request({"command": "nope"}))
        await writer.drain()
        early = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait([early], timeout=0.2)
        assert not done, "nothing may be answered before the suspended command"
        early.cancel()
        assert [c.verb for c in bus.calls] == ["echo", "slowEcho"], "later requests wait for it"
        bus.release.set()
        got = []
        for _ in range(6):
            _, body = await read_reply(reader)
            reply = json.loads(body)
            got.append(reply["result"]["args"]["n"] if reply["ok"] else reply["error"]["code"])
        assert got == [1, 2, 3, 4, 5, "unknown_command"]
    finally:
        writer.close()
    # the lane answered echo 0, slowEcho 1 and echo 2; from the routed echo 3 on, aiohttp's loop had the
    # connection, and what came after it (queued or held) was its to answer, in order
    assert counted.n == 3


async def test_idle_lane_connection_is_closed_after_the_idle_timeout(lane_server: ApiServer) -> None:
    reader, writer = await connect(lane_server)
    for n in range(3):
        writer.write(request({"command": "echo", "args": {"n": n}}))
        await read_reply(reader)
    assert await asyncio.wait_for(reader.read(1), 10) == b"", "the idle connection was closed"
    writer.close()


async def test_a_client_leaving_mid_command_does_no_harm(lane_server: ApiServer, bus: FakeBus) -> None:
    reader, writer = await connect(lane_server)
    writer.write(request({"command": "echo"}))
    await read_reply(reader)
    writer.write(request({"command": "slowEcho", "args": {"n": 1}}) + request({"command": "echo"}))
    await writer.drain()
    while not any(c.verb == "slowEcho" for c in bus.calls):
        await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)
    bus.release.set()
    await asyncio.sleep(0.05)
    reader, writer = await connect(lane_server)
    writer.write(request({"command": "echo", "args": {"n": 9}}))
    assert json.loads((await read_reply(reader))[1])["result"]["args"] == {"n": 9}
    writer.close()


async def test_a_commands_log_context_stays_with_it(lane_server: ApiServer, bus: FakeBus) -> None:
    """What a command binds to the log context (structlog contextvars) is not seen by the next one, whether it
    finished at once or after suspending."""
    seen: list[dict[str, Any]] = []
    real = bus.async_dispatch

    async def binding(verb: str, args: Any, command_id: Any, actor: Any) -> Any:
        seen.append(dict(structlog.contextvars.get_contextvars()))
        structlog.contextvars.bind_contextvars(leak=verb)
        return await real(verb, args, command_id, actor)

    bus.async_dispatch = binding  # type: ignore[method-assign]
    bus.release.set()
    reader, writer = await connect(lane_server)
    for verb in ["echo", "slowEcho", "echo", "echo"]:
        writer.write(request({"command": verb}))
        await read_reply(reader)
    writer.close()
    assert seen == [{}, {}, {}, {}]
