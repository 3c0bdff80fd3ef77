"""The HA watcher's decide steps (moldd.ha.decisions), each alone: facts in, a decision (an enum) out."""

from __future__ import annotations

from typing import Any

import pytest

from moldd.domain.ha import DownCause, HostHealth, RestartLimits, RestartPolicy
from moldd.domain.states import VMState
from moldd.ha.decisions import (
    HostWork,
    MoveCheck,
    NextStep,
    RestartOutcome,
    after_attempt,
    catch_up_host,
    catch_up_vm,
    host_health,
    host_work,
    ineligible_reason,
    move_check,
    needs_fencing_step,
    parse_trigger,
    placement_why,
    plan_attempt,
    waits_for_a_host,
)
from moldd.projection.model import VM


def vm(**kw: Any) -> VM:
    base: dict[str, Any] = dict(
        name="vm-1", id=1, internal_name="i-1", display_name="vm-1", hostname="vm-1", state=VMState.STOPPED,
        ha_enabled=True, stop_cause="crashed", host="host0",
    )  # fmt: skip
    return VM(**(base | kw))


# -- eligibility ----------------------------------------------------------------------------------------------
def test_a_crashed_ha_vm_is_eligible() -> None:
    assert ineligible_reason(vm()) is None
    assert ineligible_reason(vm(state=VMState.UNKNOWN)) is None


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"ha_enabled": False}, "HA is disabled"),
        ({"state": VMState.RUNNING}, "the VM is Running"),
        ({"state": VMState.STARTING}, "the VM is Starting"),
        ({"stop_cause": "user"}, "stopped through moldd"),
        ({"ha_status": "failed"}, "HA gave up"),
    ],
)
def test_ha_leaves_a_vm_alone_and_says_why(facts: dict[str, Any], reason: str) -> None:
    got = ineligible_reason(vm(**facts))
    assert got is not None and reason in got


def test_a_vm_that_is_gone_is_not_eligible() -> None:
    assert ineligible_reason(None) == "no such VM"


# -- parse ----------------------------------------------------------------------------------------------------
def test_trigger_parses_cause_and_policy_into_enums() -> None:
    t = parse_trigger(vm(stop_cause="guest-shutdown", ha_policy="on-failure"), "guest-shutdown", 42)
    assert t.cause is DownCause.GUEST_SHUTDOWN and t.policy is RestartPolicy.ON_FAILURE
    assert t.to_payload() == {"cause": "guest-shutdown", "trigger": "guest-shutdown", "trigger_position": 42}


def test_trigger_of_unknown_cause_and_policy_falls_back_to_other_and_always() -> None:
    t = parse_trigger(vm(stop_cause="cosmic-ray", ha_policy="sometimes"), "restart-failed", 7)
    assert t.cause is DownCause.OTHER and t.policy is RestartPolicy.ALWAYS
    assert parse_trigger(vm(stop_cause=None), "host-up", 1).cause is DownCause.OTHER


# -- before an attempt ----------------------------------------------------------------------------------------
LIMITS = RestartLimits(backoff_base_s=1.0, backoff_cap_s=60.0, max_restarts=3, window_s=600.0)


def test_first_attempt_has_no_delay() -> None:
    plan = plan_attempt(LIMITS, [], now=1000.0, blocked=0)
    assert not plan.give_up and plan.attempt == 1 and plan.delay_s == 0.0


def test_back_off_grows_with_recent_restarts() -> None:
    delays = [plan_attempt(LIMITS, [999.0] * n, now=1000.0, blocked=0).delay_s for n in range(3)]
    assert delays == [0.0, 1.0, 4.0]


def test_attempts_blocked_by_the_hosts_slow_retries_without_using_the_budget() -> None:
    plan = plan_attempt(LIMITS, [], now=1000.0, blocked=2)
    assert not plan.give_up and plan.attempt == 1 and plan.delay_s == 4.0


def test_spent_budget_gives_up_and_old_restarts_do_not_count() -> None:
    plan = plan_attempt(LIMITS, [990.0, 995.0, 999.0], now=1000.0, blocked=0)
    assert plan.give_up and plan.recent == 3
    assert not plan_attempt(LIMITS, [1.0, 2.0, 3.0], now=1000.0, blocked=0).give_up  # outside the window


# -- after an attempt -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "step"),
    [
        (RestartOutcome.STARTED, NextStep.DONE),
        (RestartOutcome.WAITING, NextStep.DONE),
        (RestartOutcome.GONE, NextStep.LET_GO),
        (RestartOutcome.FAILED, NextStep.RETRY),
        (RestartOutcome.BLOCKED, NextStep.RETRY),
    ],
)
def test_next_step_after_each_outcome(outcome: RestartOutcome, step: NextStep) -> None:
    assert after_attempt(outcome, blocked=0, max_blocked=5)[0] is step


def test_blocked_attempts_are_counted_and_only_blocked_ones() -> None:
    assert after_attempt(RestartOutcome.BLOCKED, blocked=1, max_blocked=5) == (NextStep.RETRY, 2)
    assert after_attempt(RestartOutcome.FAILED, blocked=1, max_blocked=5) == (NextStep.RETRY, 1)


def test_too_many_blocked_attempts_wait_for_a_host() -> None:
    assert after_attempt(RestartOutcome.BLOCKED, blocked=4, max_blocked=5) == (NextStep.WAIT_FOR_HOST, 5)


# -- never two copies -----------------------------------------------------------------------------------------
def test_restart_on_its_own_host_or_a_first_host_needs_no_proof() -> None:
    assert move_check("host0", "host0", HostHealth.DOWN, False) is MoveCheck.SAME_HOST
    assert move_check(None, "host1", HostHealth.UP, False) is MoveCheck.SAME_HOST


@pytest.mark.parametrize("connected", [True, False])
def test_away_from_a_fenced_host_only_the_disk_is_probed(connected: bool) -> None:
    assert move_check("host0", "host1", HostHealth.FENCED, connected) is MoveCheck.PROBE_DISK


@pytest.mark.parametrize("health", [h for h in HostHealth if h is not HostHealth.FENCED])
def test_away_from_an_unfenced_host_it_must_answer_or_the_vm_waits(health: HostHealth) -> None:
    assert move_check("host0", "host1", health, True) is MoveCheck.ASK_OLD_HOST
    assert move_check("host0", "host1", health, False) is MoveCheck.WAIT


def test_placement_reason() -> None:
    assert placement_why("host0", "host0", "c1") == "its own host is up"
    assert placement_why("host1", "host0", "c1") == "least loaded up host in cluster c1"


# -- hosts ----------------------------------------------------------------------------------------------------
def test_host_link_kinds_map_to_work() -> None:
    assert host_work("connected") is HostWork.BACK
    assert host_work("operator-fenced") is HostWork.EVACUATE
    for kind in ("disconnected", "keepalive", "check", "reconnect_failed"):
        assert host_work(kind) is HostWork.FAILURE


def test_health_of_an_unknown_host_is_up() -> None:
    assert host_health(None) is HostHealth.UP and host_health("") is HostHealth.UP
    assert host_health("FenceFailed") is HostHealth.FENCE_FAILED


def test_fencing_step_only_from_down_or_failed_fencing() -> None:
    assert [h for h in HostHealth if needs_fencing_step(h)] == [HostHealth.DOWN, HostHealth.FENCE_FAILED]


@pytest.mark.parametrize(
    ("health", "link", "connected", "item"),
    [
        (HostHealth.UP, "connected", True, None),
        (HostHealth.FENCED, "connected", True, "connected"),
        (HostHealth.SUSPECT, "disconnected", True, "connected"),
        (HostHealth.UP, "connected", False, None),
        (HostHealth.UP, "disconnected", False, "check"),
        (HostHealth.DOWN, "connected", False, "check"),
    ],
)
def test_catch_up_after_a_daemon_start(health: HostHealth, link: str, connected: bool, item: str | None) -> None:
    assert catch_up_host(health, link, connected) == item


def test_catch_up_queues_down_ha_vms_only() -> None:
    assert catch_up_vm(vm())
    assert not catch_up_vm(vm(ha_status="failed"))
    assert not catch_up_vm(vm(stop_cause="user"))
    assert not catch_up_vm(vm(ha_enabled=False))
    assert not catch_up_vm(vm(state=VMState.RUNNING))


def test_vms_waiting_for_a_host() -> None:
    assert waits_for_a_host(vm(ha_status="pending"))
    assert not waits_for_a_host(vm(ha_status=None))
    assert not waits_for_a_host(vm(ha_status="pending", state=VMState.RUNNING))
