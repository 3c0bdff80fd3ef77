"""The pieces of the fast fold: times as text without datetimes, records whose cached view is dropped by any
assignment (the viewed twin), snapshots captured as field values while the fold goes on, the collector's state
left as found, and the store's undecoded rows."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import pickle
from pathlib import Path

import pytest

from events import NewEvent, SQLiteEventStore
from events.canonical import canonical_json
from events.envelope import us_to_datetime
from moldd.app.projector import encode_snapshot
from moldd.domain.states import VMState
from moldd.eventtypes import upcasters
from moldd.projection.model import VM, Host, Job
from moldd.projection.readmodel import STORED_TO_FOLD, ReadModel, iso_us
from tests.projection.fold_corpus import corpus


def test_iso_us_is_datetime_isoformat_for_a_sweep_of_times() -> None:
    base = 1_764_534_000_000_000
    values = [0, 1, 999_999, 1_000_000, -1, -1_000_000, -1_500_001, 253_402_300_799_999_999, base]
    values += [base + d for d in (1, 10, 999_999, 1_000_000, 1_000_001, 86_400_000_000, 3_600_000_000_123)]
    values += [base + i * 7_919_017 for i in range(2000)]  # many seconds, some whole
    values += [base - i * 1_000_000 for i in range(50)]  # whole seconds, backwards
    for us in values:
        assert iso_us(us) == us_to_datetime(us).isoformat(), us


def _vm(**kw: object) -> VM:
    return VM(name="a", id=1, internal_name="i-2-1-VM", display_name="a", hostname="a",
              state=VMState.STOPPED, offering={"name": "small", "vcpus": 1}, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_a_view_is_cached_until_any_assignment_and_the_record_stays_itself() -> None:
    vm = _vm()
    plain_type = type(vm)
    view = vm.view()
    assert vm.view() is view and isinstance(vm, VM)  # cached; the viewed twin is still a VM
    assert repr(vm).startswith("VM(") and vm == _vm() and _vm() == vm
    vm.ha_status = "pending"  # any field drops the view
    assert type(vm) is plain_type and vm.view() is not view and vm.view()["ha_status"] == "pending"
    assert view["ha_status"] is None  # the old view was a private copy
    vm.view()
    vm.offering = {**vm.offering, "vcpus": 2}
    assert vm.view()["offering"]["vcpus"] == 2 and view["offering"]["vcpus"] == 1
    assert type(vm.view()["state"]) is str and vm.to_dict() == dataclasses.asdict(vm) | {"state": "Stopped"}


def test_copies_of_a_viewed_record_are_records_with_their_own_views() -> None:
    vm = _vm()
    vm.view()
    for other in (dataclasses.replace(vm, host="h2"), copy.copy(vm), pickle.loads(pickle.dumps(vm))):
        assert isinstance(other, VM)
        assert other.view()["name"] == "a"
        other.description = "changed"
        assert other.view()["description"] == "changed" and vm.view()["description"] == ""
    with pytest.raises(AttributeError):
        vm.not_a_field = 1  # type: ignore[attr-defined]  # slotted: no stray attributes
    with pytest.raises(TypeError):
        hash(vm)


def test_records_compare_by_value_only_with_their_own_kind() -> None:
    h = Host(name="h", uri="u", cluster="c", max_vms=3)
    j = Job(id="h", command="c", vm=None, status="running", created_at="t", actor="a", position=1)
    assert h != j and h == Host(name="h", uri="u", cluster="c", max_vms=3)
    h.view()
    assert h == Host(name="h", uri="u", cluster="c", max_vms=3) and h != Host(name="h", uri="u", cluster="c", max_vms=4)


def test_a_snapshot_captured_now_is_the_model_now_while_the_fold_goes_on() -> None:
    events = corpus(2, 3000)
    model = ReadModel().apply_all(events[:2000])
    expected = json.loads(canonical_json(model.to_dict()))
    parts = model.snapshot_parts()
    model.apply_all(events[2000:])  # snapshots created/reverted/deleted, disks, offerings: all replaced, not changed
    assert json.loads(encode_snapshot(parts)) == expected
    assert json.loads(encode_snapshot(model.snapshot_parts())) == json.loads(canonical_json(model.to_dict()))


def test_the_fold_leaves_the_collector_as_it_found_it() -> None:
    events = corpus(3, 300)
    rows = [
        (e.position, e.stream_id, e.stream_version, e.event_type, 1, 0, e.actor, e.correlation_id,
         canonical_json(e.payload))
        for e in events
    ]  # fmt: skip
    up = upcasters()
    assert gc.isenabled()
    ReadModel().apply_rows(rows, up.known, up.upcast)
    assert gc.isenabled()
    gc.disable()
    try:
        ReadModel().apply_rows(rows, up.known, up.upcast)
        assert not gc.isenabled()
    finally:
        gc.enable()
    bad = [*rows[:10], (11, "vm-x", 1, "vm.updated", 1, 0, "t", None, b"{not json")]
    with pytest.raises(ValueError):
        ReadModel().apply_rows(bad, up.known, up.upcast)
    assert gc.isenabled()


async def test_stored_rows_fold_to_what_stored_events_fold_to(tmp_path: Path) -> None:
    store = await SQLiteEventStore.async_open(tmp_path / "log.db")
    try:
        for ev in corpus(1, 400):
            new = NewEvent(ev.event_type, ev.payload, correlation_id=ev.correlation_id)
            await store.async_append(ev.stream_id, [new])
        stored = await store.async_read(1)
        rows = await store.async_read_rows(1)
        assert [r[0] for r in rows] == [e.position for e in stored]
        assert await store.async_read_rows(5, limit=3) == rows[4:7]
        up = upcasters()
        by_rows = ReadModel()
        by_rows.apply_rows(map(STORED_TO_FOLD, rows), up.known, up.upcast)
        assert by_rows.to_dict() == ReadModel().apply_all(stored).to_dict()
    finally:
        await store.async_close()
