"""Read-model objects from a snapshot's JSON: the same objects the constructor makes (defaults, unknown keys
ignored, required fields enforced), and a view built afresh."""

from __future__ import annotations

import pytest

from events.canonical import canonical_json, loads
from moldd.projection.model import VM, Group, Host, Job


def test_round_trip_equals_the_original_and_defaults_are_fresh() -> None:
    vm = VM(name="a", id=1, internal_name="i-2-1-VM", display_name="a", hostname="a", state="Running",
            offering={"name": "small"}, snapshots={"s": {"id": "s"}}, ha_restarts=[1.0])  # fmt: skip
    back = VM.from_dict(loads(canonical_json(vm.to_dict())))
    assert back == vm and back.view() == vm.view()
    minimal = VM.from_dict({"name": "b", "id": 2, "internal_name": "x", "display_name": "b", "hostname": "b",
                            "state": "Stopped", "not_a_field": 1})  # fmt: skip
    other = VM.from_dict({"name": "c", "id": 3, "internal_name": "y", "display_name": "c", "hostname": "c",
                          "state": "Stopped"})  # fmt: skip
    assert minimal == VM(name="b", id=2, internal_name="x", display_name="b", hostname="b", state="Stopped")
    assert minimal.offering is not other.offering and minimal.ha_restarts is not other.ha_restarts
    assert not hasattr(minimal, "not_a_field")
    for obj in (Host(name="h", uri="u", cluster="c", max_vms=3), Group(name="g", created_at="t"),
                Job(id="j", command="vm.start", vm="a", status="running", created_at="t", actor="x", position=3)):
        assert type(obj).from_dict(loads(canonical_json(obj.to_dict()))) == obj  # type: ignore[attr-defined]


def test_a_view_after_restore_follows_later_changes() -> None:
    vm = VM.from_dict({"name": "b", "id": 2, "internal_name": "x", "display_name": "b", "hostname": "b",
                       "state": "Stopped"})  # fmt: skip
    assert vm.view()["state"] == "Stopped"
    vm.state = "Running"
    assert vm.view()["state"] == "Running"


def test_a_missing_required_field_is_refused() -> None:
    with pytest.raises(TypeError, match="internal_name"):
        VM.from_dict({"name": "b", "id": 2, "display_name": "b", "hostname": "b", "state": "Stopped"})
