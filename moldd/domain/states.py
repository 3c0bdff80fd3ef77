"""VM lifecycle states and the one table of which command may run in which state.

Pure: no I/O. ``check(state, action)`` either passes or raises ``InvalidState`` naming the state and the rule;
``pending_state(action)`` is the in-progress state a command puts the VM in while it runs.
"""

from __future__ import annotations

from enum import StrEnum

from moldd.domain.errors import InvalidState


class VMState(StrEnum):
    # completed states shown to users (Mold manual)
    CREATED = "Created"
    RUNNING = "Running"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"
    EXPUNGED = "Expunged"
    # in progress
    CREATING = "Creating"
    STARTING = "Starting"
    STOPPING = "Stopping"
    DESTROYING = "Destroying"
    EXPUNGING = "Expunging"
    # CloudStack code states we need as well
    MIGRATING = "Migrating"
    ERROR = "Error"
    UNKNOWN = "Unknown"

    def __str__(self) -> str:
        return self.value


TRANSIENT = frozenset(
    {
        VMState.CREATING,
        VMState.STARTING,
        VMState.STOPPING,
        VMState.DESTROYING,
        VMState.EXPUNGING,
        VMState.MIGRATING,
    }
)


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"
    PAUSED = "paused"  # libvirt SUSPENDED: the guest exists but does not run
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    DESTROY = "destroy"
    RECOVER = "recover"
    EXPUNGE = "expunge"
    EDIT = "edit"
    CHANGE_OFFERING = "change offering"
    SCALE = "scale"
    RESIZE = "resize root disk"
    SHRINK = "shrink root disk"
    MIGRATE = "migrate"
    MOVE = "move (offline migrate)"
    RESTORE = "reinstall / change OS"
    SNAPSHOT = "create snapshot"
    MEMORY_SNAPSHOT = "create memory snapshot"
    REVERT = "revert to snapshot"
    DELETE_SNAPSHOT = "delete snapshot"
    ATTACH_ISO = "attach ISO"
    DETACH_ISO = "detach ISO"
    CONSOLE = "open console"
    SETTINGS = "change advanced settings"
    HA_RESTART = "HA restart"

    def __str__(self) -> str:
        return self.value


S = VMState
_ALLOWED: dict[Action, tuple[frozenset[VMState], str]] = {
    Action.START: (
        frozenset({S.CREATED, S.STOPPED}),
        "a VM can be started only when it is Created or Stopped",
    ),
    Action.STOP: (
        frozenset({S.RUNNING, S.STOPPED, S.ERROR, S.UNKNOWN}),
        "only a Running VM (or one in Error/Unknown; a Stopped one is a no-op success, as in CloudStack) can be "
        "stopped",
    ),
    Action.REBOOT: (frozenset({S.RUNNING}), "reboot works only on a Running VM"),
    Action.DESTROY: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED, S.ERROR, S.UNKNOWN}),
        "a VM can be destroyed when Created, Running, Stopped, in Error or Unknown",
    ),
    Action.RECOVER: (frozenset({S.DESTROYED}), "only a Destroyed VM (not yet expunged) can be recovered"),
    Action.EXPUNGE: (frozenset({S.DESTROYED}), "a VM must be Destroyed before it is expunged"),
    Action.EDIT: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED, S.ERROR}),
        "a VM can be edited when Created, Running, Stopped or in Error",
    ),
    Action.CHANGE_OFFERING: (
        frozenset({S.CREATED, S.STOPPED}),
        "the service offering can be changed only while the VM is Stopped or Created (use scaleVirtualMachine for a Running VM)",
    ),
    Action.SCALE: (
        frozenset({S.RUNNING}),
        "hot scale-up applies to a Running VM (change the offering when Stopped)",
    ),
    Action.RESIZE: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED}),
        "the root disk can grow on a Running or Stopped VM",
    ),
    Action.SHRINK: (
        frozenset({S.CREATED, S.STOPPED}),
        "the root disk can shrink only while the VM is Stopped",
    ),
    Action.MIGRATE: (
        frozenset({S.RUNNING}),
        "live migration needs a Running VM (a Stopped VM is moved offline)",
    ),
    Action.MOVE: (frozenset({S.CREATED, S.STOPPED}), "an offline move needs a Stopped VM"),
    Action.RESTORE: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED}),
        "a VM can be reinstalled when Running or Stopped",
    ),
    Action.SNAPSHOT: (frozenset({S.CREATED, S.RUNNING, S.STOPPED}), "snapshots need a Running or Stopped VM"),
    Action.MEMORY_SNAPSHOT: (frozenset({S.RUNNING}), "a snapshot with memory needs a Running VM"),
    Action.REVERT: (frozenset({S.CREATED, S.RUNNING, S.STOPPED}), "revert needs a Running or Stopped VM"),
    Action.DELETE_SNAPSHOT: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED, S.ERROR}),
        "snapshots can be deleted when the VM is not busy",
    ),
    Action.ATTACH_ISO: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED}),
        "an ISO can be attached to a Running or Stopped VM",
    ),
    Action.DETACH_ISO: (
        frozenset({S.CREATED, S.RUNNING, S.STOPPED}),
        "an ISO can be detached from a Running or Stopped VM",
    ),
    Action.CONSOLE: (frozenset({S.RUNNING}), "the console is available only while the VM is Running"),
    Action.SETTINGS: (
        frozenset({S.CREATED, S.STOPPED, S.RUNNING}),
        "advanced settings can be changed on a Created, Stopped or Running VM (applied at next start)",
    ),
    Action.HA_RESTART: (frozenset({S.STOPPED, S.UNKNOWN}), "HA restarts only a VM that went down by itself"),
}

_PENDING: dict[Action, VMState] = {
    Action.START: S.STARTING,
    Action.STOP: S.STOPPING,
    Action.DESTROY: S.DESTROYING,
    Action.EXPUNGE: S.EXPUNGING,
    Action.MIGRATE: S.MIGRATING,
    Action.MOVE: S.MIGRATING,
    Action.HA_RESTART: S.STARTING,
}


def allowed_states(action: Action) -> frozenset[VMState]:
    return _ALLOWED[action][0]


def is_allowed(state: VMState, action: Action) -> bool:
    return state in _ALLOWED[action][0]


def check(state: VMState, action: Action) -> None:
    """Raise ``InvalidState`` (naming the state and the rule) unless ``action`` may run in ``state``."""
    allowed, rule = _ALLOWED[action]
    state = VMState(state)  # a plain string (from JSON) is accepted too
    if state not in allowed:
        raise InvalidState(f"cannot {action}: the VM is {state.value} ({rule})", field="state")


def check_stop(state: VMState, *, ha_restart_pending: bool) -> None:
    """Like ``check(state, Action.STOP)``. Stopping a Stopped VM is a no-op success (CloudStack); for one whose HA
    restart is pending (back-off) it is also how a user keeps an HA VM down (the Mold manual: stop it through Mold,
    or disable HA)."""
    check(state, Action.STOP)


def pending_state(action: Action) -> VMState | None:
    """The in-progress state a command puts the VM in, or None when the state does not change meanwhile."""
    return _PENDING.get(action)
