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
