"""``GET /metrics`` on a real daemon with real lab hosts, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moldlab.testing.harness import Client, CommandFailed
from tests.daemon.test_ha import deploy_ha, qemu_pid, wait_event
from tests.observe.conftest import get

pytestmark = pytest.mark.libvirt

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


async def scrape(daemon: Any) -> dict[str, list[Any]]:
    """sample name -> samples (``Sample(name, labels, value, ...)``)."""
    status, ctype, body = await get(daemon.config.socket, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=" in ctype
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("moldd_"), family.name
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name}{labels}; have {sorted(samples)[:80]}"
    return float(sum(found))


async def test_metrics_scrape_parses_and_follows_conventions(daemon: Any, client: Client) -> None:
    samples = await scrape(daemon)
    for name, group in samples.items():
        assert NAME.match(name)
        for s in group:
            assert "vm" not in s.labels and "name" not in s.labels  # VM names are never labels
            assert len(s.labels) <= 4
    # counters end in _total, durations are in seconds
    for name in samples:
        if name.endswith("_created"):
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if "duration" in base or "latency" in base:
            assert base.endswith("_seconds"), name
    assert value(samples, "moldd_hosts", health="Up", link="connected") == 2
    assert value(samples, "moldd_host_connected") == 2
    assert value(samples, "moldd_vms") == 0
    assert value(samples, "moldd_log_head_position") >= 2  # the two host.registered entries at least
    assert value(samples, "moldd_ha_watchers_healthy") == 1
    assert value(samples, "moldd_cluster_headroom_vms", cluster="c1") == 4  # (2 hosts - 1) x 4
    assert value(samples, "moldd_api_connections") >= 1  # this scrape's own connection
    for cause in ("crashed", "destroyed", "guest-shutdown", "host-failed", "found-stopped", "other"):
        assert value(samples, "moldd_ha_restarts_total", cause=cause) == 0


async def test_metrics_count_commands_appends_and_vms(daemon: Any, client: Client) -> None:
    before = await scrape(daemon)
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    assert job["status"] == "succeeded"
    with pytest.raises(CommandFailed):
        await client.call("startVirtualMachine", id="no-such-vm")
    after = await scrape(daemon)
    assert value(after, "moldd_vms", state="Running", power_state="on") == 1
    assert value(after, "moldd_jobs", status="succeeded") >= 1
    deploys = value(after, "moldd_command_duration_seconds_count", verb="deployVirtualMachine", outcome="ok")
    assert deploys == 1
    assert (
        value(after, "moldd_command_duration_seconds_count", verb="startVirtualMachine", outcome="not_found")
        == 1
    )
    # +Inf bucket holds every observation
    assert (
        value(
            after,
            "moldd_command_duration_seconds_bucket",
            verb="deployVirtualMachine",
            outcome="ok",
            le="+Inf",
        )
        == 1
    )
    grew = value(after, "moldd_log_appended_events_total") - value(before, "moldd_log_appended_events_total")
    head_grew = value(after, "moldd_log_head_position") - value(before, "moldd_log_head_position")
    assert grew == head_grew > 0  # every appended event is counted once
    assert value(after, "moldd_log_commit_groups_total") >= 1
    assert value(after, "moldd_log_commit_duration_seconds_count") == value(
        after, "moldd_log_commit_groups_total"
    )
    assert value(after, "moldd_projection_position") <= value(after, "moldd_log_head_position")
    assert value(after, "moldd_log_append_queue_depth") >= 0


async def test_metrics_count_an_ha_restart_with_its_cause_and_decision_latency(
    daemon: Any, client: Client, clean_lab: Any
) -> None:
    vm = await deploy_ha(client)
    pos = (await client.events(vm["name"]))[-1]["position"]
    os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos)
    samples = await scrape(daemon)
    assert value(samples, "moldd_ha_restarts_total", cause="crashed") == 1
    assert value(samples, "moldd_ha_restart_failures_total") == 0
    assert value(samples, "moldd_ha_decision_seconds_count", decision="restart") == 1
    assert value(samples, "moldd_libvirt_domain_events_total") >= 1
    assert value(samples, "moldd_vms_ha_enabled") == 1


async def test_metrics_follower_gauge_counts_live_event_streams(daemon: Any) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.config.socket))) as s:
        async with s.get("http://moldd/v1/events?from=1") as resp:
            await resp.content.readline()  # the stream is open and serving
            samples = await scrape(daemon)
            assert value(samples, "moldd_api_event_followers") == 1
    deadline = time.monotonic() + 10
    while value(await scrape(daemon), "moldd_api_event_followers") != 0:
        assert time.monotonic() < deadline, "the follower gauge did not drop when the client left"
        await asyncio.sleep(0.05)
