from __future__ import annotations

import pytest

from moldd.domain.errors import ValidationError
from moldd.domain.ha import (
    DownCause,
    HostHealth,
    RestartLimits,
    RestartPolicy,
    down_cause,
    evacuation_order,
    host_move_allowed,
    may_start_elsewhere,
    parse_policy,
    should_restart,
)


@pytest.mark.parametrize(
    ("detail", "cause"),
    [("FAILED", DownCause.CRASHED), ("CRASHED", DownCause.CRASHED), ("DESTROYED", DownCause.DESTROYED),
     ("SHUTDOWN", DownCause.GUEST_SHUTDOWN), ("MIGRATED", DownCause.OTHER)],
)  # fmt: skip
def test_libvirt_stop_details_map_to_causes(detail: str, cause: DownCause) -> None:
    assert down_cause("STOPPED", detail) is cause
    assert down_cause("SHUTDOWN", detail) is DownCause.OTHER


def test_guest_shutdown_is_restarted_only_under_the_always_policy() -> None:
    assert should_restart(True, RestartPolicy.ALWAYS, DownCause.GUEST_SHUTDOWN)
    assert not should_restart(True, RestartPolicy.ON_FAILURE, DownCause.GUEST_SHUTDOWN)
    for cause in (DownCause.CRASHED, DownCause.DESTROYED, DownCause.HOST_FAILED, DownCause.FOUND_STOPPED):
        assert should_restart(True, RestartPolicy.ON_FAILURE, cause)
        assert not should_restart(False, RestartPolicy.ALWAYS, cause)


def test_backoff_grows_quadratically_and_is_capped() -> None:
    limits = RestartLimits(backoff_base_s=1, backoff_cap_s=20, max_restarts=5, window_s=60)
    assert [limits.backoff(n) for n in range(6)] == [0, 1, 4, 9, 16, 20]


def test_restart_budget_counts_only_the_window() -> None:
    limits = RestartLimits(max_restarts=3, window_s=10)
    assert limits.recent([1, 2, 95, 99], now=100) == 2
    assert not limits.exhausted([1, 2, 95, 99], now=100)
    assert limits.exhausted([91, 95, 99], now=100)


def test_host_health_moves_only_forward_through_fencing() -> None:
    assert host_move_allowed(HostHealth.UP, HostHealth.SUSPECT)
    assert not host_move_allowed(HostHealth.UP, HostHealth.FENCED)
    assert not host_move_allowed(HostHealth.SUSPECT, HostHealth.FENCING)
    assert host_move_allowed(HostHealth.FENCING, HostHealth.FENCE_FAILED)
    assert may_start_elsewhere(HostHealth.FENCED) and not may_start_elsewhere(HostHealth.FENCE_FAILED)
    assert not may_start_elsewhere(HostHealth.DOWN) and not may_start_elsewhere(HostHealth.SUSPECT)


def test_evacuation_order_is_priority_then_name() -> None:
    assert evacuation_order([("b", 1), ("a", 1), ("c", 9)]) == ["c", "a", "b"]


def test_unknown_policy_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValidationError) as refused:
        parse_policy("sometimes")
    assert "always" in refused.value.message and refused.value.field == "hapolicy"
