"""The metric hooks on their own: the log writer's commit report (real SQLite), a failing commit, and the
counters derived from log entries (real StoredEvents from a store), with bounded labels."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from events import MemoryEventStore, NewEvent, SQLiteEventStore
from moldd.observe.metrics import Metrics, metric_names


def sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_writer_reports_every_group_commit(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    calls: list[tuple[int, float, bool]] = []
    store._writer.on_commit = lambda n, s, ok: calls.append((n, s, ok))
    try:
        await asyncio.gather(
            *(
                store.async_append(f"s-{i}", [NewEvent("t.x", {"i": i}), NewEvent("t.y", {})])
                for i in range(20)
            )
        )
        head, _ = await store.async_head()
    finally:
        await store.async_close()
    assert sum(n for n, _, _ in calls) == head == 40
    assert 1 <= len(calls) <= 20 and all(ok and s > 0 for _, s, ok in calls)


class FailingCommits(MemoryEventStore):
    async def _async_commit(self, rows: Any, commands: Any) -> None:
        raise OSError("disk full")


async def test_a_failed_commit_is_counted_as_a_failure_not_as_appended_events() -> None:
    m = Metrics()
    store = FailingCommits()
    store._writer.on_commit = m.observe_commit
    try:
        await store.async_append("s", [NewEvent("t.x", {})])
    except OSError:
        pass
    assert sample(m, "moldd_log_commit_failures_total") == 1
    assert sample(m, "moldd_log_appended_events_total") == 0
    assert sample(m, "moldd_log_commit_groups_total") == 0


async def events(*items: tuple[str, str, dict[str, Any]]) -> list[Any]:
    store = MemoryEventStore()
    out = []
    for stream, etype, payload in items:
        out.extend((await store.async_append(stream, [NewEvent(etype, payload)])).events)
    return out


async def test_counters_follow_the_log_with_bounded_labels() -> None:
    m = Metrics()
    evs = await events(
        ("vm-a", "libvirt.domain_event", {"event": "STOPPED", "detail": "FAILED"}),
        ("vm-a", "ha.restart.scheduled", {"cause": "crashed", "trigger_position": 1}),
        ("vm-a", "ha.restart.succeeded", {"cause": "crashed"}),
        ("vm-b", "ha.restart.failed", {"cause": "made-up-cause"}),
        ("vm-b", "ha.gave_up", {"cause": "host-failed", "trigger_position": 999}),
        ("daemon", "ha.watcher_restarted", {"watcher": "evil\nname"}),
        ("host-h1", "host.health", {"to": "Fencing"}),
        ("host-h1", "host.health", {"to": "FenceFailed", "fence": {"ok": False, "seconds": 2.5}}),
        ("host-h1", "host.health", {"to": "Fenced", "fence": {"ok": True, "seconds": 0.2}}),
        ("host-h1", "host.link", {"kind": "connected"}),
        ("host-h1", "host.link", {"kind": "disconnected"}),
        ("host-h1", "host.link", {"kind": "connected"}),
    )
    for ev in evs:
        m.on_event(ev, None)
    assert sample(m, "moldd_ha_restarts_total", cause="crashed") == 1
    assert sample(m, "moldd_ha_restart_failures_total", cause="other") == 1  # unknown cause: no new label
    assert sample(m, "moldd_ha_give_ups_total", cause="host-failed") == 1
    assert sample(m, "moldd_ha_decision_seconds_count", decision="restart") == 1
    assert sample(m, "moldd_ha_decision_seconds_count", decision="gave_up") == 0  # trigger never seen
    assert sample(m, "moldd_ha_watcher_restarts_total", watcher="other") == 1
    assert sample(m, "moldd_fence_attempts_total", outcome="failed") == 1
    assert sample(m, "moldd_fence_attempts_total", outcome="ok") == 1
    assert sample(m, "moldd_fence_duration_seconds_sum", outcome="failed") == 2.5
    assert sample(m, "moldd_host_health_changes_total", health="FenceFailed") == 1
    assert sample(m, "moldd_libvirt_reconnects_total", host="h1") == 1  # the first connect is not a reconnect
    assert sample(m, "moldd_libvirt_disconnects_total", host="h1") == 1
    assert sample(m, "moldd_libvirt_domain_events_total") == 1
    assert not any("evil" in n for n in metric_names(m.registry))
    labels = {k for fam in m.registry.collect() for s in fam.samples for k in s.labels.values()}
    assert "made-up-cause" not in labels and "evil\nname" not in labels


def test_an_unbound_registry_still_renders() -> None:
    text = Metrics().exposition().decode()
    assert "moldd_ha_restarts_total" in text and "moldd_vms" not in text  # no read model yet: no VM gauges


async def test_metrics_on_a_tcp_listener_need_the_bearer_token() -> None:
    import aiohttp
    from aiohttp import web
    from prometheus_client.parser import text_string_to_metric_families

    from moldd.observe.web import metrics_route

    m = Metrics()
    app = web.Application()
    app.router.add_get("/metrics", metrics_route(m, "s3cret-token"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                            {"Authorization": "Bearer s3cret-toke"}):  # fmt: skip
                async with s.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp:
                    assert resp.status == 401, headers
                    assert (await resp.json())["error"]["field"] == "Authorization"
            async with s.get(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer s3cret-token"}
            ) as resp:
                assert resp.status == 200
                names = {f.name for f in text_string_to_metric_families(await resp.text())}
                assert "moldd_ha_restarts" in names
    finally:
        await runner.cleanup()


def test_leader_role_and_epoch_when_the_log_is_shared() -> None:
    from types import SimpleNamespace

    from moldd.projection.readmodel import ReadModel

    m = Metrics()
    model = ReadModel()
    config = SimpleNamespace(hosts=[], tolerated_host_failures=1, host=lambda name: None)
    m.bind(SimpleNamespace(model=model, config=config, verbs=lambda: [], health_checks={}), None)
    assert "moldd_leader" not in m.exposition().decode()  # a single node has no such series

    class Role:
        epoch = 7
        acting = True
        terms = 2

        def __init__(self) -> None:
            self.leading = True

        def is_leading(self) -> bool:
            return self.leading

    role = Role()
    m.cluster = role
    assert sample(m, "moldd_leader") == 1 and sample(m, "moldd_leader_epoch") == 7
    assert sample(m, "moldd_leader_acting") == 1 and sample(m, "moldd_leader_terms_total") == 2
    role.leading = False
    assert sample(m, "moldd_leader") == 0
