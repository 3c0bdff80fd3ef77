"""The HA watcher's decisions, as pure functions of the facts it gathered: parse → decide → act.

``moldd.ha.watcher`` reads the read model and the hosts (parse), asks these functions what to do (decide) and
records and does it (act). Each function here takes values and returns a value (an enum or a small frozen
dataclass); none reads the clock, the log or a host, so each is tested alone (tests/domain/test_ha_decisions.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from moldd.domain.ha import DownCause, HostHealth, RestartLimits, RestartPolicy
from moldd.domain.states import VMState
from moldd.projection.model import VM

RESTARTABLE_CAUSES = frozenset(str(c) for c in DownCause)
DOWN_STATES = (VMState.STOPPED, VMState.UNKNOWN)  # the states HA restarts a VM from
ON_HOST_STATES = (VMState.RUNNING, VMState.STARTING, VMState.STOPPING, VMState.MIGRATING, VMState.UNKNOWN)
"""States in which a VM may still have a domain on its host: what a fenced host's evacuation records Stopped."""
SETTLED_STATES = (VMState.STOPPED, VMState.CREATED, VMState.DESTROYED, VMState.EXPUNGED, VMState.ERROR)


def host_health(value: str | None) -> HostHealth:
    """A host's health as recorded in the read model (a host the model does not know is Up)."""
    return HostHealth(value) if value else HostHealth.UP


# -- one VM: whether HA acts at all ---------------------------------------------------------------------------
def ineligible_reason(vm: VM | None) -> str | None:
    """Why HA must leave this VM alone now, or None when a restart is wanted."""
    if vm is None:
        return "no such VM"
    if not vm.ha_enabled:
        return "HA is disabled for this VM"
    if vm.state not in DOWN_STATES:
        return f"the VM is {vm.state}"
    if vm.stop_cause == "user":
        return "it was stopped through moldd"
    if vm.ha_status == "failed":
        return "HA gave up on it (Error); stop it, then start it by hand"
    return None


@dataclass(frozen=True)
class Trigger:
    """What set an HA job off: the VM's down cause, its restart policy, and the event that queued the job."""

    cause: DownCause
    policy: RestartPolicy
    trigger: str  # what queued the job: a down cause, "restart-failed", "host-up", "host-fenced", ...
    position: int  # of the event that queued it

    def to_payload(self) -> dict[str, Any]:
        """The cause fields every ``ha.*`` event of the job carries."""
        return {"cause": str(self.cause), "trigger": self.trigger, "trigger_position": self.position}


def parse_trigger(vm: VM, trigger: str, position: int) -> Trigger:
    """The VM's recorded stop cause and HA policy as enums (an unknown cause is OTHER, an unknown policy ALWAYS)."""
    cause = DownCause(vm.stop_cause) if vm.stop_cause in RESTARTABLE_CAUSES else DownCause.OTHER
    try:
        policy = RestartPolicy(vm.ha_policy)
    except ValueError:
        policy = RestartPolicy.ALWAYS
    return Trigger(cause, policy, trigger, position)


# -- the restart loop: before and after each attempt ----------------------------------------------------------
@dataclass(frozen=True)
class AttemptPlan:
    """Before an attempt: give up (the restart budget is spent), or attempt number ``attempt`` after ``delay_s``."""

    give_up: bool
    recent: int  # restarts within the limits' window
    attempt: int
    delay_s: float


def plan_attempt(limits: RestartLimits, restart_times: Sequence[float], now: float, blocked: int) -> AttemptPlan:
    """``blocked``: attempts in a row that failed for reasons not the VM's own; they do not use up its budget but
    slow the retries down the same way."""
    recent = limits.recent(restart_times, now)
    if recent >= limits.max_restarts:
        return AttemptPlan(True, recent, recent + 1, 0.0)
    return AttemptPlan(False, recent, recent + 1, max(limits.backoff(recent), limits.backoff(blocked)))


class RestartOutcome(StrEnum):
    """What one restart attempt came to."""

    STARTED = "started"
    FAILED = "failed"  # the VM's own failure (ha.restart.failed recorded): counts against its budget
    BLOCKED = "blocked"  # failed for a reason that is not the VM's (its host, a live copy): does not count
    WAITING = "waiting"  # nothing started: waits for room, or for its old host to be fenced (ha.waiting recorded)
    GONE = "gone"  # no longer eligible (started by hand, still running on its old host, ...)

    def __str__(self) -> str:
        return self.value


class NextStep(StrEnum):
    """What the restart loop does after an attempt."""

    DONE = "done"  # started, or waiting for an event that queues the VM again
    LET_GO = "let-go"  # no longer eligible: record why (ha.cancelled) if HA still shows it pending
    RETRY = "retry"  # go round: the next attempt's back-off grows with the count
    WAIT_FOR_HOST = "wait-for-host"  # too many attempts in a row failed for the hosts: wait for one to come up

    def __str__(self) -> str:
        return self.value


def after_attempt(outcome: RestartOutcome, blocked: int, max_blocked: int) -> tuple[NextStep, int]:
    """The next step and the new count of attempts in a row that failed for reasons not the VM's."""
    if outcome is RestartOutcome.GONE:
        return NextStep.LET_GO, blocked
    if outcome in (RestartOutcome.STARTED, RestartOutcome.WAITING):
        return NextStep.DONE, blocked
    if outcome is RestartOutcome.BLOCKED:
        blocked += 1
        return (NextStep.WAIT_FOR_HOST if blocked >= max_blocked else NextStep.RETRY), blocked
    return NextStep.RETRY, blocked


# -- one attempt: never two copies ----------------------------------------------------------------------------
class MoveCheck(StrEnum):
    """What must be proven before a VM starts on ``target`` while its last host was ``old``."""

    SAME_HOST = "same-host"  # no other host involved (its own host, or none yet): start it
    PROBE_DISK = "probe-disk"  # the old host is fenced: only make sure no process still holds the disk
    ASK_OLD_HOST = "ask-old-host"  # the old host answers: its domain must be off, then probe the disk
    WAIT = "wait"  # the old host neither answers nor is fenced: a copy may still run there

    def __str__(self) -> str:
        return self.value


def move_check(old: str | None, target: str, old_health: HostHealth, old_connected: bool) -> MoveCheck:
    if old is None or target == old:
        return MoveCheck.SAME_HOST
    if old_health is HostHealth.FENCED:
        return MoveCheck.PROBE_DISK
    return MoveCheck.ASK_OLD_HOST if old_connected else MoveCheck.WAIT


def placement_why(target: str, old: str | None, cluster: str | None) -> str:
    return "its own host is up" if target == old else f"least loaded up host in cluster {cluster}"


# -- hosts ----------------------------------------------------------------------------------------------------
class HostWork(StrEnum):
    """What the host watcher does with a host's link event."""

    BACK = "back"  # it answers again: call a grace-period handler off, bring its health to Up
    EVACUATE = "evacuate"  # an operator confirmed it is off: move its VMs now (replacing a running handler)
    FAILURE = "failure"  # it stopped answering: Suspect → grace → Down → fence → evacuate (unless one runs)

    def __str__(self) -> str:
        return self.value


def host_work(kind: str) -> HostWork:
    if kind == "connected":
        return HostWork.BACK
    if kind == "operator-fenced":
        return HostWork.EVACUATE
    return HostWork.FAILURE


def needs_fencing_step(health: HostHealth) -> bool:
    """A Down host (or one whose fencing failed) moves to Fencing before the fence command runs (again)."""
    return health in (HostHealth.DOWN, HostHealth.FENCE_FAILED)


def catch_up_host(health: HostHealth, link: str, connected: bool) -> str | None:
    """After a daemon start: the host-watcher item a host needs (``connected`` / ``check``), or None.

    A host that answers now but that the log left unhealthy is brought back (its "connected" event was folded
    before the HA listener was registered); one that does not answer is checked."""
    if connected:
        return "connected" if health is not HostHealth.UP else None
    if health is not HostHealth.UP or link == "disconnected":
        return "check"
    return None


def catch_up_vm(vm: VM) -> bool:
    """After a daemon start: an HA VM left down for a reason HA acts on, that HA has not given up on."""
    return (
        vm.ha_enabled
        and vm.state in DOWN_STATES
        and vm.stop_cause in RESTARTABLE_CAUSES
        and vm.ha_status != "failed"
    )


def waits_for_a_host(vm: VM) -> bool:
    """An HA VM waiting (pending) for a place: a host coming up, or being fenced, lets it try again."""
    return vm.ha_enabled and vm.ha_status == "pending" and vm.state in DOWN_STATES
