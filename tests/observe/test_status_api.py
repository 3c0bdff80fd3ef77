"""The read-only operator routes on the daemon's socket: the page's files, ``/v1/status`` and the SSE feed
(resume after ``Last-Event-ID`` without gap or duplicate; bad input refused with the field at fault)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from moldlab.testing.harness import Client
from tests.observe.conftest import get

pytestmark = pytest.mark.libvirt


def session(daemon: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.config.socket)))


async def read_sse(resp: aiohttp.ClientResponse, count: int) -> list[tuple[int, dict[str, Any]]]:
    """The first ``count`` messages of an SSE stream: (id, data)."""
    out: list[tuple[int, dict[str, Any]]] = []
    msg: dict[str, str] = {}
    while len(out) < count:
        line = (await resp.content.readline()).decode()
        assert line, "the stream ended early"
        line = line.rstrip("\n")
        if not line:
            if "data" in msg:
                out.append((int(msg["id"]), json.loads(msg["data"])))
            msg = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            msg[key] = value
    return out


async def test_page_files_are_served_with_a_strict_policy(daemon: Any) -> None:
    status, ctype, body = await get(daemon.config.socket, "/status")
    assert status == 200 and ctype.startswith("text/html")
    assert b"/status/status.js" in body and b"http" not in body.replace(b"http-equiv", b"")  # nothing remote
    for name, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
        status, ctype, body = await get(daemon.config.socket, f"/status/{name}")
        assert status == 200 and ctype.startswith(kind) and body
    async with session(daemon) as s, s.get("http://moldd/status") as resp:
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
    for bad in ("/status/nope.js", "/status/..%2f__init__.py", "/status/index.html%00"):
        status, ctype, body = await get(daemon.config.socket, bad)
        assert status == 404 and json.loads(body)["ok"] is False, bad


async def test_status_document_has_clusters_hosts_vms_and_jobs(daemon: Any, client: Client) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True)
    status, _, body = await get(daemon.config.socket, "/v1/status")
    assert status == 200
    doc = json.loads(body)["result"]
    assert doc["clusters"] == [
        {"cluster": "c1", "hosts": 2, "hosts_up": 2, "perhostlimit": 4, "toleratedfailures": 1, "used": 1,
         "limit": 4, "headroom": 3}
    ]  # fmt: skip
    # the page's one-pass counts agree with the verbs' (placement's) rule
    listed = (await client.call("listClusters"))["result"]["cluster"]
    assert [{k: v for k, v in c.items() if k != "hosts_up"} for c in doc["clusters"]] == listed
    hosts = {h["name"]: h for h in (await client.call("listHosts"))["result"]["host"]}
    assert {h["name"]: (h["vms"], h["running"]) for h in doc["hosts"]} == {
        n: (h["vms"], h["running"]) for n, h in hosts.items()
    }
    assert {h["name"]: (h["health"], h["link"]) for h in doc["hosts"]} == {
        "host0": ("Up", "connected"),
        "host1": ("Up", "connected"),
    }
    (vm,) = doc["vms"]
    assert (vm["name"], vm["state"], vm["power_state"], vm["ha_enabled"]) == (
        job["vm"],
        "Running",
        "on",
        True,
    )
    assert [j["id"] for j in doc["jobs"]] == [job["id"]]
    assert doc["position"] > 0


async def test_sse_feed_resumes_after_last_event_id_without_gap_or_duplicate(
    daemon: Any, client: Client
) -> None:
    await client.job("deployVirtualMachine", template="tiny", offering="small")
    head = (await client.call("listEvents", limit=10000))["result"]["event"][-1]["position"]
    async with session(daemon) as s:
        async with s.get("http://moldd/v1/events/sse?from=1") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await read_sse(resp, 3)
        assert [i for i, _ in first] == [1, 2, 3]
        assert all(i == data["entry"]["position"] for i, data in first)
        # a reconnecting EventSource sends Last-Event-ID; it wins over ?from=
        async with s.get("http://moldd/v1/events/sse?from=1", headers={"Last-Event-ID": "3"}) as resp:
            rest = await read_sse(resp, head - 3)
            assert [i for i, _ in rest] == list(range(4, head + 1))
            # live: a new entry arrives with the state it produced
            reply = await client.call("createInstanceGroup", name="web")
            ((pos, live),) = await read_sse(resp, 1)
            assert (
                pos == head + 1 == live["entry"]["position"]
                and live["entry"]["event_type"] == "group.created"
            )
            assert reply["position"] == pos


async def test_sse_live_entries_carry_the_vm_state_they_produced(daemon: Any, client: Client) -> None:
    head = (await client.call("listEvents", limit=10000))["result"]["event"][-1]["position"]
    async with session(daemon) as s, s.get(f"http://moldd/v1/events/sse?from={head + 1}") as resp:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small")
        messages = await read_sse(resp, 4)
        states = [data["vm"]["state"] for _, data in messages if "vm" in data]
        assert states and states[0] in ("Creating", "Created", "Starting")
        assert all(data["vm"]["name"] == job["vm"] for _, data in messages if "vm" in data)
        assert any("job" in data and data["job"]["id"] == job["id"] for _, data in messages)


@pytest.mark.parametrize("bad", ["-1", "x", "1.5", "99999999999999999999999", ""])
async def test_sse_bad_from_is_refused_with_the_field(daemon: Any, bad: str) -> None:
    status, _, body = await get(daemon.config.socket, f"/v1/events/sse?from={bad}")
    err = json.loads(body)["error"]
    assert status == 400 and err["field"] == "from", err


async def test_sse_unknown_parameter_is_refused(daemon: Any) -> None:
    status, _, body = await get(daemon.config.socket, "/v1/events/sse?form=3")
    assert status == 400 and json.loads(body)["error"]["field"] == "form"


async def test_operator_routes_are_read_only(daemon: Any) -> None:
    async with session(daemon) as s:
        for path in ("/metrics", "/status", "/v1/status", "/v1/events/sse"):
            async with s.post(f"http://moldd{path}", data=b"{}") as resp:
                assert resp.status == 405, path


async def test_status_vms_come_a_page_at_a_time_in_id_order(daemon: Any, client: Client) -> None:
    for i in range(4):  # the lab cluster's limit
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname=f"p{i}")
    listed = [v["name"] for v in (await client.call("listVirtualMachines"))["result"]["virtualmachine"]]
    assert len(listed) == 4
    pages = []
    for page in (1, 2, 3):
        status, _, body = await get(daemon.config.socket, f"/v1/status?page={page}&pagesize=3")
        assert status == 200
        doc = json.loads(body)["result"]
        assert (doc["vm_count"], doc["page"], doc["pagesize"]) == (4, page, 3)
        pages.append([v["name"] for v in doc["vms"]])
    assert pages == [listed[0:3], listed[3:4], []]
    # no VMs at all (what the page's refresh after each entry asks): clusters, hosts and jobs still whole
    _, _, body = await get(daemon.config.socket, "/v1/status?pagesize=0")
    doc = json.loads(body)["result"]
    assert doc["vms"] == [] and doc["vm_count"] == 4 and len(doc["hosts"]) == 2 and doc["clusters"]
    # the default: a first page of STATUS_PAGE_SIZE (here every VM)
    _, _, body = await get(daemon.config.socket, "/v1/status")
    doc = json.loads(body)["result"]
    assert [v["name"] for v in doc["vms"]] == listed and (doc["page"], doc["pagesize"]) == (1, 500)


@pytest.mark.parametrize(
    ("query", "field"),
    [("page=0", "page"), ("page=-1", "page"), ("page=x", "page"), ("pagesize=10001", "pagesize"),
     ("pagesize=1.5", "pagesize"), ("pagesize=", "pagesize"), ("page=1_0", "page"), ("vms=all", "vms"),
     ("page=99999999999999999999", "page")],
)  # fmt: skip
async def test_status_bad_paging_is_refused_with_the_field(daemon: Any, query: str, field: str) -> None:
    status, _, body = await get(daemon.config.socket, f"/v1/status?{query}")
    error = json.loads(body)["error"]
    assert status == 400 and error["field"] == field and error["code"] == "invalid_argument", (query, error)
