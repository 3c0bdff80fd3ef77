"""A client command id is executed exactly once, whatever the timing of its retries, and is bound to the actor,
the verb and the args of its first use (real daemon, real lab hosts, real socket)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import pytest

from moldlab.testing.harness import Client

pytestmark = pytest.mark.libvirt

N = 10


async def burst(client: Client, verb: str, args: dict[str, Any], command_id: str, n: int = N) -> list[Any]:
    """``n`` concurrent requests with one id, each on its own connection."""

    async def one() -> tuple[int, dict[str, Any]]:
        async with Client(client.socket_path) as c:
            return await c.raw(verb, args, command_id)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def log_entries(client: Client) -> list[dict[str, Any]]:
    return list((await client.call("listEvents", limit=10000))["result"]["event"])


def assert_one_execution(replies: list[tuple[int, dict[str, Any]]], command_id: str) -> dict[str, Any]:
    statuses = Counter(status for status, _ in replies)
    assert statuses == Counter({200: len(replies)}), [r for r in replies if r[0] != 200]
    positions = {reply["position"] for _, reply in replies}
    assert len(positions) == 1, positions
    jobs = {(reply["result"].get("job") or {}).get("id") for _, reply in replies}
    assert len(jobs) == 1, jobs
    firsts = [reply for _, reply in replies if not reply["result"].get("duplicate")]
    assert len(firsts) == 1, "exactly one reply is the execution itself; the others are duplicates"
    return firsts[0]


async def test_concurrent_deploys_with_one_id_deploy_once(client: Client, clean_lab: Any) -> None:
    before = await log_entries(client)
    replies = await burst(client, "deployVirtualMachine", {"template": "tiny", "offering": "small"}, "dep-1")
    first = assert_one_execution(replies, "dep-1")
    assert {r["result"]["vm"]["name"] for _, r in replies} == {first["result"]["vm"]["name"]}
    job = await client.wait_job(first["result"]["job"]["id"])
    assert job["status"] == "succeeded", job
    after = (await log_entries(client))[len(before) :]
    kinds = Counter(e["event_type"] for e in after)
    assert kinds["vm.deploy.requested"] == 1, kinds
    assert kinds["cluster.capacity_low"] <= 1, kinds
    vms = (await client.call("listVirtualMachines", listall=True))["result"]["virtualmachine"]
    assert len([v for v in vms if v["state"] != "Expunged"]) == 1
    # a retry after the fact still answers with the first result and writes nothing
    head = len(await log_entries(client))
    again = await client.raw("deployVirtualMachine", {"template": "tiny", "offering": "small"}, "dep-1")
    assert again[0] == 200 and again[1]["result"]["duplicate"] is True
    assert again[1]["position"] == first["position"]
    assert len(await log_entries(client)) == head


async def test_concurrent_stops_and_starts_with_one_id(client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    name = job["vm"]
    replies = await burst(client, "stopVirtualMachine", {"id": name, "forced": True}, "stop-1")
    first = assert_one_execution(replies, "stop-1")
    assert (await client.wait_job(first["result"]["job"]["id"]))["status"] == "succeeded"
    replies = await burst(client, "startVirtualMachine", {"id": name}, "start-1")
    first = assert_one_execution(replies, "start-1")
    assert (await client.wait_job(first["result"]["job"]["id"]))["status"] == "succeeded"
    mine = Counter(
        (e["event_type"], e["command_id"])
        for e in await client.events(name)
        if e["command_id"] in ("stop-1", "start-1") or e["correlation_id"] in ("stop-1", "start-1")
    )
    assert mine[("vm.stop.requested", "stop-1")] == 1 and mine[("vm.start.requested", "start-1")] == 1, mine
    assert sum(mine.values()) == 4, mine  # each: requested + its one outcome


async def test_concurrent_group_creates_with_one_id(client: Client) -> None:
    replies = await burst(client, "createInstanceGroup", {"name": "g-once"}, "grp-1")
    statuses = Counter(status for status, _ in replies)
    assert statuses == Counter({200: N}), replies
    assert len({r["position"] for _, r in replies}) == 1
    created = [e for e in await client.events_of_stream("group-g-once") if e["event_type"] == "group.created"]
    assert len(created) == 1


async def test_a_refusal_is_shared_not_repeated(client: Client) -> None:
    """The first execution is refused (no such template): every concurrent duplicate gets the same refusal,
    nothing is written, and the id stays free for a corrected command."""
    head = len(await log_entries(client))
    replies = await burst(client, "deployVirtualMachine", {"template": "nope", "offering": "small"}, "bad-1")
    assert {status for status, _ in replies} == {404}
    assert {r["error"]["field"] for _, r in replies} == {"template"}
    assert len(await log_entries(client)) == head


async def test_reused_id_for_another_command_is_refused(client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    name = job["vm"]
    started = await client.raw("stopVirtualMachine", {"id": name, "forced": True}, "x-1")
    assert started[0] == 200
    await client.wait_job(started[1]["result"]["job"]["id"])
    head = len(await log_entries(client))
    status, reply = await client.raw("startVirtualMachine", {"id": name}, "x-1")
    assert status == 409 and reply["error"]["code"] == "id_reused" and reply["error"]["field"] == "id"
    assert "stopVirtualMachine" in reply["error"]["message"]
    # same verb, different args
    status, reply = await client.raw("stopVirtualMachine", {"id": name, "forced": False}, "x-1")
    assert status == 409 and reply["error"]["code"] == "id_reused"
    assert len(await log_entries(client)) == head


async def test_binding_is_read_back_from_the_log_after_restart(make_config: Any, clean_lab: Any) -> None:
    from moldlab.testing.harness import running_daemon

    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        first = await client.call("createInstanceGroup", "g-x", name="g-restart")
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        again = await client.raw("createInstanceGroup", {"name": "g-restart"}, "g-x")
        assert again[0] == 200 and again[1]["result"]["duplicate"] is True
        assert again[1]["position"] == first["position"]
        status, reply = await client.raw("deleteInstanceGroup", {"name": "g-restart"}, "g-x")
        assert status == 409 and reply["error"]["code"] == "id_reused"
        assert "createInstanceGroup" in reply["error"]["message"]


async def test_an_id_belongs_to_its_user(daemon: Any, client: Client) -> None:
    """The same command under the same id from another user is refused; from the same uid in another process
    (another pid) it is a retry."""
    from moldd.app.bus import Actor
    from moldd.app.service import IdReused

    first = await client.call("createInstanceGroup", "owned-1", name="g-owned")
    me = Actor(uid=os.getuid(), gid=os.getgid(), pid=999_999, user="root")
    again = await daemon.app.async_dispatch("createInstanceGroup", {"name": "g-owned"}, "owned-1", me)
    assert again.position == first["position"] and again.result["duplicate"] is True
    other = Actor(uid=4321, gid=4321, pid=1, user="mallory")
    with pytest.raises(IdReused) as info:
        await daemon.app.async_dispatch("createInstanceGroup", {"name": "g-owned"}, "owned-1", other)
    assert "createInstanceGroup" in info.value.message and info.value.field == "id"
    api_user = Actor(user="alice", via="apikey", role="operator")
    with pytest.raises(IdReused):
        await daemon.app.async_dispatch("createInstanceGroup", {"name": "g-owned"}, "owned-1", api_user)
