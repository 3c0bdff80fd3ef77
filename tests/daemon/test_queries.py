"""Read verbs of the real daemon through the real socket: listVirtualMachines paging, listEvents filters."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from moldd.cli import moldctl
from moldlab.testing.harness import Client, CommandFailed

pytestmark = pytest.mark.libvirt


async def _deploy(client: Client, n: int) -> list[str]:
    names = []
    for i in range(n):
        job = await client.job(
            "deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname=f"p-{i}"
        )
        assert job["status"] == "succeeded", job
        names.append(job["vm"])
    return names


async def test_list_vms_pages_in_id_order_and_counts_every_match(client: Client) -> None:
    await _deploy(client, 3)
    everything = (await client.call("listVirtualMachines"))["result"]
    assert everything["count"] == 3
    ids = [vm["id"] for vm in everything["virtualmachine"]]
    assert ids == sorted(ids)

    pages = []
    for page in (1, 2, 3):
        result = (await client.call("listVirtualMachines", page=page, pagesize=2))["result"]
        assert result["count"] == 3  # every match, so a client knows how many pages there are
        pages.append([vm["id"] for vm in result["virtualmachine"]])
    assert pages == [ids[:2], ids[2:], []]
    assert (await client.call("listVirtualMachines", pagesize=1))["result"]["virtualmachine"][0]["id"] == ids[
        0
    ]
    # paging applies after the filters
    one = (await client.call("listVirtualMachines", keyword="p-2", page=1, pagesize=5))["result"]
    assert one["count"] == 1 and one["virtualmachine"][0]["display_name"] == "p-2"


async def test_list_vms_paging_is_validated(client: Client) -> None:
    for args, field in (
        ({"page": 1}, "pagesize"),
        ({"page": 0, "pagesize": 10}, "page"),
        ({"page": 1, "pagesize": 0}, "pagesize"),
        ({"pagesize": 10001}, "pagesize"),
        ({"page": "x", "pagesize": 10}, "page"),
    ):
        with pytest.raises(CommandFailed) as err:
            await client.call("listVirtualMachines", **args)
        assert err.value.status == 400 and err.value.field == field, args


async def test_list_reflects_an_update_at_once(client: Client) -> None:
    (name,) = await _deploy(client, 1)
    before = (await client.call("listVirtualMachines"))["result"]["virtualmachine"][0]
    await client.call("updateVirtualMachine", id=name, description="changed")
    after = (await client.call("listVirtualMachines"))["result"]["virtualmachine"][0]
    assert before["description"] == "" and after["description"] == "changed"
    assert after["version"] > before["version"]


async def test_list_events_of_one_job_by_correlation(client: Client, daemon: Any) -> None:
    jobs = []
    for i in range(2):
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False,
                               displayname=f"c-{i}")  # fmt: skip
        assert job["status"] == "succeeded", job
        jobs.append(job)
    everything = (await client.call("listEvents", limit=10000))["result"]["event"]
    for job in jobs:
        expected = [e["position"] for e in everything if job["id"] in (e["correlation_id"], e["command_id"])]
        assert len(expected) >= 2  # the request and its outcome at least
        got = (await client.call("listEvents", correlation=job["id"]))["result"]
        assert [e["position"] for e in got["event"]] == expected and got["count"] == len(expected)
        newest = (await client.call("listEvents", correlation=job["id"], newest=True, limit=1))["result"]
        assert [e["position"] for e in newest["event"]] == expected[-1:]
        assert newest["more"] == {"older": len(expected) - 1, "from": expected[0]}
        later = (await client.call("listEvents", correlation=job["id"], **{"from": expected[-1]}))["result"]
        assert [e["position"] for e in later["event"]] == expected[-1:]
        in_stream = (await client.call("listEvents", correlation=job["id"], vm=job["vm"]))["result"]["event"]
        assert [e["position"] for e in in_stream] == expected
    other = (await client.call("listEvents", correlation=jobs[0]["id"], vm=jobs[1]["vm"]))["result"]
    assert other["count"] == 0
    assert (await client.call("listEvents", correlation="no-such-job"))["result"]["count"] == 0
    for bad in ("", 5, ["x"]):
        with pytest.raises(CommandFailed) as err:
            await client.call("listEvents", correlation=bad)
        assert err.value.field == "correlation"

    # moldctl events --correlation (without --follow) goes through listEvents
    out, errs = io.StringIO(), io.StringIO()
    argv = ["--socket", str(daemon.config.socket), "events", "--correlation", jobs[0]["id"]]
    assert await asyncio.to_thread(moldctl.run, argv, out, errs) == 0, errs.getvalue()
    lines = [line for line in out.getvalue().splitlines()[1:] if line[:1].isdigit()]
    expected = [e["position"] for e in everything if jobs[0]["id"] in (e["correlation_id"], e["command_id"])]
    assert [int(line.split()[0]) for line in lines] == expected
