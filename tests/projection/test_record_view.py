"""A record's view (``RecordView``): a read-only mapping of the record as it was when taken, states as plain
strings, nested containers shared (never copied) yet unaffected by later folds, its JSON that of ``to_dict()``."""

from __future__ import annotations

import json
from collections.abc import Mapping

import orjson
import pytest

from moldd.domain.states import VMState
from moldd.projection.model import VM, Job, RecordView


def _vm() -> VM:
    return VM(name="a", id=1, internal_name="i-2-1-VM", display_name="a", hostname="a", state=VMState.RUNNING,
              offering={"name": "small", "vcpus": 1}, snapshots={"s": {"id": "s", "vm_state": VMState.STOPPED}},
              ha_restarts=[1.5], prior_state=VMState.STOPPED)  # fmt: skip


def test_a_view_reads_like_the_dict_of_the_record() -> None:
    vm = _vm()
    view = vm.view()
    plain = vm.to_dict()
    assert isinstance(view, Mapping) and isinstance(view, RecordView)
    assert view == plain and plain == view and dict(view) == plain and {**view} == plain
    assert len(view) == len(plain) and list(view) == list(plain) and list(view.keys()) == list(plain)
    assert type(view["state"]) is str and view["state"] == "Running" and view.get("prior_state") == "Stopped"
    assert view.get("nope") is None and view.get("nope", 3) == 3 and "name" in view and "nope" not in view
    with pytest.raises(KeyError):
        view["nope"]
    assert json.loads(orjson.dumps(view.encoded_json())) == json.loads(json.dumps(plain))
    assert view.encoded_json() is view.encoded_json()  # encoded once
    assert view != {**plain, "name": "b"} and view != 1


def test_a_view_keeps_the_record_as_it_was_when_taken() -> None:
    vm = _vm()
    view = vm.view()
    offering = view["offering"]
    assert offering is vm.offering  # shared, not copied
    vm.offering = {**vm.offering, "vcpus": 2}  # the fold replaces containers (copy on write)
    vm.state = VMState.STOPPED
    vm.snapshots = {}
    assert view["offering"] == {"name": "small", "vcpus": 1} and view["state"] == "Running" and "s" in view["snapshots"]
    assert json.loads(bytes(memoryview(orjson.dumps(view.encoded_json()))))["offering"]["vcpus"] == 1
    assert vm.view() is not view and vm.view()["offering"]["vcpus"] == 2 and vm.view()["state"] == "Stopped"


def test_views_of_other_records_and_equality() -> None:
    job = Job(id="j", command="vm.start", vm="a", status="running", created_at="t", actor="x", position=3)
    assert job.view() == job.to_dict() and job.view() != _vm().view()
    assert _vm().view() == _vm().view()  # equal records, equal views
    assert repr(job.view()).startswith("RecordView({'id': 'j'")
