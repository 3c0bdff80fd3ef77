"""Lists answered from the per-position cache (moldd.app.listing) are never stale: every reply shows each VM as
it was at the reply's own log position, however updates and reads interleave."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from moldd.app.listing import ViewList, cache_for
from moldd.projection.readmodel import ReadModel
from moldlab.testing.harness import Client

pytestmark = pytest.mark.libvirt


async def _deploy(client: Client, n: int) -> list[str]:
    names = []
    for i in range(n):
        group = {"group": "web"} if i % 2 else {}
        job = await client.job(
            "deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname=f"c-{i}", **group
        )
        assert job["status"] == "succeeded", job
        names.append(job["vm"])
    return names


async def test_a_list_read_right_after_an_update_shows_it(client: Client) -> None:
    await client.call("createInstanceGroup", name="web")
    names = await _deploy(client, 3)
    queries: list[dict[str, Any]] = [{}, {"page": 1, "pagesize": 2}, {"group": "web"}, {"keyword": "c-"}]
    for _ in range(2):  # the second round is answered from the cache
        for q in queries:
            await client.call("listVirtualMachines", **q)
    for round_ in range(5):
        for name in names:
            text = f"r{round_}-{name}"
            update = await client.call("updateVirtualMachine", id=name, description=text)
            for q in queries:
                reply = await client.call("listVirtualMachines", **q)
                assert reply["position"] >= update["position"]
                seen = {v["name"]: v["description"] for v in reply["result"]["virtualmachine"]}
                if name in seen:
                    assert seen[name] == text, (q, seen)
            assert (await client.vm(name))["description"] == text


async def test_concurrent_updates_and_cached_reads_agree_with_each_replys_position(client: Client) -> None:
    """Writers change descriptions while readers list (the same few queries, so most reads hit the cache).
    Every reply must show, for each VM, the description of the last update at or before its position."""
    await client.call("createInstanceGroup", name="web")
    names = await _deploy(client, 4)
    written: list[tuple[int, str, str]] = []  # (position, vm, description)
    replies: list[tuple[int, dict[str, str]]] = []
    queries: list[dict[str, Any]] = [{}, {"page": 2, "pagesize": 2}, {"group": "web"}, {"id": names[0]}]
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        async with Client(client.socket_path) as c:
            for i in range(25):
                name = names[(w + i) % len(names)]
                text = f"w{w}-{i}"
                reply = await c.call("updateVirtualMachine", id=name, description=text)
                written.append((reply["position"], name, text))

    async def reader(r: int) -> None:
        rng = random.Random(r)
        async with Client(client.socket_path) as c:
            while not stop.is_set():
                reply = await c.call("listVirtualMachines", **rng.choice(queries))
                seen = {v["name"]: v["description"] for v in reply["result"]["virtualmachine"]}
                replies.append((reply["position"], seen))

    readers = [asyncio.ensure_future(reader(r)) for r in range(4)]
    await asyncio.gather(*(writer(w) for w in range(3)))
    stop.set()
    await asyncio.gather(*readers)
    assert len(written) == 75 and len(replies) > 75
    written.sort()
    for position, seen in replies:
        for name, description in seen.items():
            expected = next((t for p, n, t in reversed(written) if n == name and p <= position), "")
            assert description == expected, (position, name, description, expected)


def test_the_cache_belongs_to_one_position_of_one_model() -> None:
    model = ReadModel()
    first = cache_for(model)
    assert cache_for(model) is first and first.get("k", lambda: 1) == 1 and first.get("k", lambda: 2) == 1
    model.position += 1  # what ReadModel.apply does before any change
    second = cache_for(model)
    assert second is not first and second.get("k", lambda: 2) == 2
    assert cache_for(ReadModel()) is not second  # another model (a restored snapshot) has its own
    views = ViewList([])
    assert views == [] and isinstance(views, list)
