"""Reply encoding (orjson, with read-model views spliced from their cached JSON) and body parsing."""

from __future__ import annotations

import dataclasses
import enum
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from moldd.api.handlers import dumps, loads
from moldd.domain.states import VMState
from moldd.projection.model import VM, Host, Job


def _vm() -> VM:
    return VM(
        name="vm-a", id=1, internal_name="i-2-1-VM", display_name="a", hostname="a", state=VMState.CREATED,
        offering={"name": "small", "vcpus": 1}, snapshots={"s1": {"state": "Ready"}},
    )  # fmt: skip


class Colour(str, enum.Enum):  # noqa: UP042 - the mixin whose str() is not its value
    RED = "red"


def test_dumps_writes_what_the_stdlib_encoder_writes() -> None:
    value = {"a": [1, 2.5, None, True], "é": "ü", "state": VMState.RUNNING, "c": Colour.RED, "t": (1, 2)}
    assert json.loads(dumps(value)) == json.loads(json.dumps(value))
    assert dumps({"x": 1}) == b'{"x":1}'  # compact, UTF-8


def test_dumps_falls_back_for_what_orjson_refuses() -> None:
    assert json.loads(dumps({1: "a", None: "b"})) == {"1": "a", "null": "b"}
    assert json.loads(dumps({"big": 2**70})) == {"big": 2**70}
    assert json.loads(dumps({"p": Path("/x"), "d": datetime(2026, 1, 1, tzinfo=UTC)}))["p"] == "/x"


def test_views_are_spliced_and_follow_changes() -> None:
    vm = _vm()
    first = json.loads(dumps({"vms": [vm.view()]}))["vms"][0]
    assert first == json.loads(json.dumps(dataclasses.asdict(vm)))
    assert vm.view() is vm.view()  # cached while nothing changes
    vm.description = "changed"
    vm.snapshots["s2"] = {"state": "Creating"}
    assert json.loads(dumps(vm.view()))["description"] == "changed"
    assert set(json.loads(dumps(vm.view()))["snapshots"]) == {"s1", "s2"}


def test_to_dict_is_a_private_copy_like_asdict() -> None:
    vm = _vm()
    view = vm.to_dict()
    assert view == dataclasses.asdict(vm) and type(view["state"]) is str
    view["extra"] = 1  # top level: the caller's own
    assert "extra" not in vm.to_dict()
    vm.offering["vcpus"] = 2  # the fold changes nested data in the same step as an assignment
    vm.position += 1
    assert view["offering"]["vcpus"] == 1 and vm.to_dict()["offering"]["vcpus"] == 2
    assert VM.from_dict(vm.to_dict()) == vm
    for obj in (Host(name="h", uri="test:///default", cluster="c", max_vms=2),
                Job(id="j", command="vm.deploy", vm=None, status="running", created_at="", actor="a", position=1)):  # fmt: skip
        assert obj.to_dict() == dataclasses.asdict(obj)


def test_loads_refuses_what_is_not_json() -> None:
    assert loads(b'{"a": [1]}') == {"a": [1]}
    for raw in (b'{"a":', b"\xff", b'{"a": NaN}'):
        with pytest.raises(ValueError):
            loads(raw)


def test_view_lists_encode_as_their_views_whether_kept_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from moldd.app import listing

    vms = []
    for i in range(5):
        vm = _vm()
        vm.name, vm.id, vm.description = f"vm-{i}", i, "é" * i
        vms.append(vm)
    plain = json.loads(json.dumps({"vms": [vm.to_dict() for vm in vms]}))
    cache = listing.ListCache(position=1)
    kept = listing.view_list(vms, cache)
    assert kept == [vm.view() for vm in vms] and isinstance(kept, list)
    for _ in range(2):  # encoded once, then the kept JSON
        assert json.loads(dumps({"vms": kept})) == plain
    assert cache.encoded_bytes > 0
    # without a cache, or past the item limit or the byte budget, nothing is kept: the same JSON every time
    monkeypatch.setattr(listing, "MAX_ENCODED_ITEMS", 3)
    for views in (listing.view_list(vms), listing.view_list(vms, listing.ListCache(position=1))):
        assert json.loads(dumps({"vms": views})) == plain and not hasattr(views, "_json")
    monkeypatch.setattr(listing, "MAX_ENCODED_ITEMS", 1000)
    full = listing.ListCache(position=1)
    full.encoded_bytes = listing.MAX_ENCODED_BYTES
    views = listing.view_list(vms, full)
    assert json.loads(dumps({"vms": views})) == plain and not hasattr(views, "_json")
    # a VM changed after its list was built: the list (of the position it was built at) still shows the old view
    vms[0].description = "changed"
    assert json.loads(dumps({"vms": kept}))["vms"][0]["description"] == ""
    assert listing.view_list(vms)[0]["description"] == "changed"
