"""Finished jobs are pruned from the read model (the log keeps them): bounded, newest kept, running jobs never
dropped, and the same jobs kept whether the model was folded in one go or restored from a snapshot midway."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from events import StoredEvent
from events.canonical import canonical_json, loads
from moldd.projection import readmodel
from moldd.projection.readmodel import ReadModel

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readmodel, "MAX_FINISHED_JOBS", 50)
    monkeypatch.setattr(readmodel, "PRUNE_SLACK", 10)


def build(n_jobs: int, *, same_second_every: int = 0) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    versions: dict[str, int] = {}
    second = 0

    def add(stream: str, et: str, payload: dict[str, Any], corr: str | None, tick: bool = True) -> None:
        nonlocal second
        versions[stream] = versions.get(stream, 0) + 1
        if tick:
            second += 1
        events.append(StoredEvent(
            len(events) + 1, stream, versions[stream], et, 1, T0 + timedelta(seconds=second), "t", None, None,
            corr, payload, b"", b"",
        ))  # fmt: skip

    add("vm-a", "vm.deploy.requested", {
        "name": "a", "id": 1, "internal_name": "i-2-1-VM", "display_name": "a", "hostname": "a", "host": "h1",
        "cluster": "c1", "offering": {"name": "small", "vcpus": 1, "memory_mib": 128},
    }, "deploy")  # fmt: skip
    add("vm-a", "vm.created", {"host": "h1", "job_status": "succeeded"}, "deploy")
    add("vm-a", "vm.reboot.requested", {}, "never-finishes")  # a job still running: never pruned
    for i in range(n_jobs):
        add("vm-a", "vm.reboot.requested", {}, f"j{i}")
        tick = not (same_second_every and i % same_second_every)
        add("vm-a", "vm.rebooted", {"job_status": "succeeded"}, f"j{i}", tick=tick)
    return events


def finished(model: ReadModel) -> list[str]:
    return [j.id for j in model.jobs.values() if j.finished_at is not None]


def test_finished_jobs_are_bounded_newest_kept_running_kept() -> None:
    model = ReadModel().apply_all(build(500))
    done = finished(model)
    assert 50 <= len(done) <= 60
    assert "j499" in model.jobs and "j0" not in model.jobs and "deploy" not in model.jobs
    assert model.jobs["never-finishes"].status == "running"
    newest = sorted(int(j[1:]) for j in done if j.startswith("j"))
    assert newest == list(range(newest[0], 500))  # the oldest ones went, none in between


def test_jobs_finishing_in_the_same_instant_as_the_cutoff_stay_together() -> None:
    events = build(300, same_second_every=7)
    finish = {e.correlation_id: e.recorded_at.isoformat() for e in events if e.payload.get("job_status")}
    model = ReadModel().apply_all(events)
    oldest_kept = min(model.jobs[j].finished_at or "" for j in finished(model))
    pruned = [j for j in finish if j not in model.jobs]
    assert pruned and all(finish[j] < oldest_kept for j in pruned)
    assert 50 <= len(finished(model)) <= 60 + 7


@pytest.mark.parametrize("cut", [1, 3, 60, 61, 123, 250, 599, 777])
def test_the_same_jobs_whether_restored_from_a_snapshot_or_folded_in_one_go(cut: int) -> None:
    events = build(400, same_second_every=5)
    whole = ReadModel().apply_all(events)
    first = ReadModel().apply_all(events[:cut])
    restored = ReadModel.from_dict(loads(canonical_json(first.to_dict())))  # the snapshot's round trip
    restored.apply_all(events[cut:])
    assert set(restored.jobs) == set(whole.jobs)
    assert restored.to_dict() == whole.to_dict() | {"jobs": restored.to_dict()["jobs"]}
    assert {k: v.to_dict() for k, v in restored.jobs.items()} == {k: v.to_dict() for k, v in whole.jobs.items()}


def test_a_snapshot_written_before_pruning_is_pruned_on_restore() -> None:
    events = build(300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readmodel, "MAX_FINISHED_JOBS", 10_000)
        unbounded = ReadModel().apply_all(events)
    assert len(finished(unbounded)) == 301
    restored = ReadModel.from_dict(loads(canonical_json(unbounded.to_dict())))
    assert len(finished(restored)) == 50 and "j299" in restored.jobs
