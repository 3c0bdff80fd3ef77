"""GET /v1/events (NDJSON, filters, heartbeats) and GET /v1/health."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from moldd.api import ApiServer
from tests.api.conftest import FakeBus


async def _lines(
    resp: aiohttp.ClientResponse, n: int, *, skip_heartbeats: bool = True
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line.endswith(b"\n"), line
        obj = json.loads(line)
        if skip_heartbeats and "heartbeat" in obj:
            continue
        out.append(obj)
    return out


async def _seed(bus: FakeBus) -> None:
    await bus._append("vm-a", "vm.created", {"state": "Stopped"}, command_id="c1", correlation_id="c1")
    await bus._append("vm-b", "vm.created", {"state": "Stopped"}, command_id="c2", correlation_id="c2")
    await bus._append("vm-a", "vm.started", {"state": "Running"}, correlation_id="c3")
    await bus._append("vm-b", "vm.started", {"state": "Running"}, correlation_id="c2")


async def test_events_stream_is_ndjson_from_position_then_live(
    http: aiohttp.ClientSession, bus: FakeBus
) -> None:
    await _seed(bus)
    async with http.get("http://moldd/v1/events?from=3") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        first = await _lines(resp, 2)
        assert [e["position"] for e in first] == [3, 4]
        await bus._append("vm-c", "vm.created", {}, correlation_id="c9")
        (live,) = await _lines(resp, 1)
        assert (live["position"], live["stream_id"]) == (5, "vm-c")


async def test_events_filter_by_stream(http: aiohttp.ClientSession, bus: FakeBus) -> None:
    await _seed(bus)
    async with http.get("http://moldd/v1/events", params={"stream": "vm-a"}) as resp:
        entries = await _lines(resp, 2)
    assert [(e["position"], e["stream_id"]) for e in entries] == [(1, "vm-a"), (3, "vm-a")]


async def test_events_filter_by_correlation_includes_the_requesting_command(
    http: aiohttp.ClientSession, bus: FakeBus
) -> None:
    await bus._append("vm-b", "vm.start.requested", {}, command_id="job-7", correlation_id=None)
    await _seed(bus)
    await bus._append("vm-b", "vm.started", {}, correlation_id="job-7")
    async with http.get("http://moldd/v1/events", params={"correlation": "job-7", "from": "1"}) as resp:
        entries = await _lines(resp, 2)
    assert [e["position"] for e in entries] == [1, 6]


async def test_idle_event_stream_sends_heartbeats(http: aiohttp.ClientSession, bus: FakeBus) -> None:
    await _seed(bus)  # entries exist but none match: filtered traffic must not starve the heartbeat
    async with http.get("http://moldd/v1/events", params={"stream": "vm-none"}) as resp:
        beats = await _lines(resp, 2, skip_heartbeats=False)
    assert all(set(b) == {"heartbeat"} for b in beats)


async def test_events_bad_from_is_400(http: aiohttp.ClientSession) -> None:
    for query in ("from=abc", "from=-1", "colour=red", "from=99999999999999999999999", "from=1_000"):
        async with http.get(f"http://moldd/v1/events?{query}") as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"]["field"] == query.split("=")[0]


async def test_open_event_stream_does_not_hold_up_shutdown(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    resp = await http.get("http://moldd/v1/events")
    await _lines(resp, 1, skip_heartbeats=False)
    started = asyncio.get_running_loop().time()
    await server.async_close()
    assert asyncio.get_running_loop().time() - started < 2
    resp.close()


async def test_health_200_when_ok_and_503_when_not(http: aiohttp.ClientSession, bus: FakeBus) -> None:
    async with http.get("http://moldd/v1/health") as resp:
        assert (resp.status, await resp.json()) == (200, {"ok": True, "watchers": "up", "position": 0})
    bus.ok = False
    async with http.get("http://moldd/v1/health") as resp:
        assert (resp.status, (await resp.json())["ok"]) == (503, False)


async def test_a_client_that_stops_reading_is_dropped(bus: FakeBus, sock_dir: Any) -> None:
    """A stalled reader (a suspended ``moldctl events -f``) must not pin a handler and a subscription
    forever: a write that cannot complete within write_timeout_s ends the stream."""
    from moldd.api import ApiSettings, async_serve

    for i in range(3000):  # ~3 MB: more than the socket buffers hold
        await bus._append("vm-a", "vm.updated", {"i": i, "pad": "x" * 1000})
    srv = await async_serve(bus, sock_dir / "slow.sock", use_socket_activation=False,
                            settings=ApiSettings(heartbeat_s=0.2, write_timeout_s=0.5))  # fmt: skip
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "slow.sock"))
        writer.write(b"GET /v1/events HTTP/1.1\r\nHost: moldd\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.5)  # not reading: the server's writes block, then time out
        # What was sent is still readable, then the server has hung up (EOF), not kept streaming.
        data = await asyncio.wait_for(reader.read(), 5)
        assert b'"position":1,' in data and b'"position":3000,' not in data
        writer.close()
    finally:
        await srv.async_close()
