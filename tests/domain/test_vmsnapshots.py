"""Pure VM snapshot rules: creation by state and limit, revert by state, the tree on delete."""

from __future__ import annotations

import pytest

from moldd.domain.errors import Conflict, InvalidState, ValidationError
from moldd.domain.states import VMState
from moldd.domain.vmsnapshots import check_create, remove_from_tree, revert_state, validate_snapshot_name

S = VMState


def test_memory_snapshots_only_of_running_vms_and_disk_only_only_of_stopped_ones() -> None:
    check_create(S.RUNNING, memory=True, count=0, limit=10)
    check_create(S.STOPPED, memory=False, count=0, limit=10)
    with pytest.raises(InvalidState, match="Stopped"):
        check_create(S.STOPPED, memory=True, count=0, limit=10)
    with pytest.raises(InvalidState, match="Running"):
        check_create(S.RUNNING, memory=False, count=0, limit=10)
    with pytest.raises(InvalidState, match="Destroyed"):
        check_create(S.DESTROYED, memory=False, count=0, limit=10)


def test_at_most_the_limit() -> None:
    check_create(S.STOPPED, memory=False, count=9, limit=10)
    with pytest.raises(Conflict) as exc:
        check_create(S.STOPPED, memory=False, count=10, limit=10)
    assert exc.value.code == "snapshot_limit"


def test_revert_rules_by_state() -> None:
    assert revert_state(S.RUNNING, memory=True) is S.RUNNING
    assert revert_state(S.STOPPED, memory=True) is S.RUNNING
    assert revert_state(S.STOPPED, memory=False) is S.STOPPED
    assert revert_state(S.CREATED, memory=False) is S.CREATED
    with pytest.raises(InvalidState, match="stop the VM first"):
        revert_state(S.RUNNING, memory=False)
    with pytest.raises(InvalidState, match="Migrating"):
        revert_state(S.MIGRATING, memory=True)


def test_delete_moves_children_up_and_the_current_marker_to_the_parent() -> None:
    snaps = {"a": {"parent": None}, "b": {"parent": "a"}, "c": {"parent": "b"}, "d": {"parent": "b"}}
    out, current = remove_from_tree(snaps, "b", "b")
    assert out == {"a": {"parent": None}, "c": {"parent": "a"}, "d": {"parent": "a"}} and current == "a"
    out, current = remove_from_tree(snaps, "c", "a")
    assert out["b"] == {"parent": None} and current == "c"
    assert snaps["b"] == {"parent": "a"}  # the input is not changed


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 65, 3])
def test_snapshot_names(bad: object) -> None:
    assert validate_snapshot_name("s1.before-upgrade_2") == "s1.before-upgrade_2"
    with pytest.raises(ValidationError):
        validate_snapshot_name(bad)
