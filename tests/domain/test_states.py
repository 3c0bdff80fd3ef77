"""The one command/state table: every pair is either allowed or refused with the state and the rule named."""

from __future__ import annotations

import pytest

from moldd.domain.errors import InvalidState
from moldd.domain.states import TRANSIENT, Action, VMState, check, check_stop, is_allowed, pending_state

S = VMState


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("state", list(VMState))
def test_every_pair_is_allowed_or_refused_naming_state_and_rule(state: VMState, action: Action) -> None:
    if is_allowed(state, action):
        check(state, action)
        return
    with pytest.raises(InvalidState) as refused:
        check(state, action)
    assert refused.value.field == "state"
    assert state.value in refused.value.message and str(action) in refused.value.message


@pytest.mark.parametrize("action", list(Action))
def test_no_command_runs_on_a_vm_that_is_busy_or_gone(action: Action) -> None:
    for state in (*TRANSIENT, S.EXPUNGED):
        assert not is_allowed(state, action), (state, action)


@pytest.mark.parametrize(
    ("state", "action", "allowed"),
    [
        (S.RUNNING, Action.REBOOT, True),
        (S.STOPPED, Action.REBOOT, False),
        (S.DESTROYED, Action.START, False),
        (S.DESTROYED, Action.RECOVER, True),
        (S.STOPPED, Action.RECOVER, False),
        (S.RUNNING, Action.EXPUNGE, False),
        (S.DESTROYED, Action.EXPUNGE, True),
        (S.RUNNING, Action.CHANGE_OFFERING, False),
        (S.STOPPED, Action.CHANGE_OFFERING, True),
        (S.RUNNING, Action.SHRINK, False),
        (S.RUNNING, Action.RESIZE, True),
        (S.STOPPED, Action.MIGRATE, False),
        (S.STOPPED, Action.MOVE, True),
        (S.STOPPED, Action.MEMORY_SNAPSHOT, False),
        (S.RUNNING, Action.CONSOLE, True),
        (S.CREATED, Action.START, True),
    ],
)
def test_rules_from_the_manual_and_cloudstack(state: VMState, action: Action, allowed: bool) -> None:
    assert is_allowed(state, action) is allowed


def test_stopping_a_stopped_vm_is_a_no_op_success_as_in_cloudstack() -> None:
    check_stop(S.STOPPED, ha_restart_pending=True)  # also how a user keeps an HA VM down during its back-off
    check_stop(S.STOPPED, ha_restart_pending=False)
    check_stop(S.RUNNING, ha_restart_pending=False)
    with pytest.raises(InvalidState):
        check_stop(S.DESTROYED, ha_restart_pending=False)


def test_pending_states_are_transient() -> None:
    for action in Action:
        pending = pending_state(action)
        assert pending is None or pending in TRANSIENT
    assert pending_state(Action.START) is S.STARTING and pending_state(Action.REBOOT) is None
