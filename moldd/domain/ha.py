"""HA policy: when a VM that went down is restarted, how fast, how often, and the host health states.

Pure functions; the watcher in ``moldd.ha`` feeds them facts and records each decision in the log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from moldd.domain.errors import ValidationError


class RestartPolicy(StrEnum):
    """``always``: the Mold manual's rule — any stop moldd did not ask for is restarted, a shutdown from inside the
    guest included (libvirt cannot tell it from a crash). ``on-failure``: a clean guest shutdown is respected."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"

    def __str__(self) -> str:
        return self.value


class DownCause(StrEnum):
    CRASHED = "crashed"  # qemu died / was killed (STOPPED/FAILED, CRASHED)
    DESTROYED = "destroyed"  # virsh destroy behind moldd's back (STOPPED/DESTROYED)
    GUEST_SHUTDOWN = "guest-shutdown"  # poweroff inside the guest or ACPI from outside (STOPPED/SHUTDOWN)
    HOST_FAILED = "host-failed"  # its host went down and was fenced
    FOUND_STOPPED = "found-stopped"  # resync found it off while moldd believed it was running
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


def parse_policy(value: object, field: str = "hapolicy") -> RestartPolicy:
    try:
        return RestartPolicy(str(value))
    except ValueError:
        raise ValidationError(
            f"{field} must be one of {', '.join(p.value for p in RestartPolicy)}, got {value!r:.60}", field=field
        ) from None


def down_cause(event: str, detail: str) -> DownCause:
    """Map a libvirt lifecycle STOPPED detail to why the VM went down."""
    if event != "STOPPED":
        return DownCause.OTHER
    return {
        "FAILED": DownCause.CRASHED,
        "CRASHED": DownCause.CRASHED,
        "DESTROYED": DownCause.DESTROYED,
        "SHUTDOWN": DownCause.GUEST_SHUTDOWN,
    }.get(detail, DownCause.OTHER)


_NOT_THE_VMS_FAULT = (
    ("lock", "its disk is locked by another process (a live copy)"),
    ("Address already in use", "a port it needs (VNC, migration) was taken"),
    ("Failed to bind", "a port it needs (VNC, migration) was taken"),
    ("not connected", "its host does not answer"),
    ("did not answer", "its host does not answer"),
)


def blame_elsewhere(message: str) -> str | None:
    """Why a failed (re)start is not the VM's own failure (the host, the lab, a live copy), or None when it is.
    Only the VM's own failures count against its restart budget."""
    for needle, why in _NOT_THE_VMS_FAULT:
        if needle in message:
            return why
    return None


def should_restart(ha_enabled: bool, policy: RestartPolicy, cause: DownCause) -> bool:
    if not ha_enabled:
        return False
    if cause is DownCause.GUEST_SHUTDOWN:
        return policy is RestartPolicy.ALWAYS
    return True


@dataclass(frozen=True)
class RestartLimits:
    """Restart-storm guard: back-off base·n² seconds capped (KubeVirt's curve, scaled), at most ``max_restarts``
    restarts within ``window_s``; past that the VM goes to Error and HA stops touching it."""

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    max_restarts: int = 5
    window_s: float = 600.0

    def backoff(self, recent_restarts: int) -> float:
        """Delay before the next attempt: 0 for the first restart, then base·n² capped."""
        if recent_restarts <= 0:
            return 0.0
        return min(self.backoff_cap_s, self.backoff_base_s * recent_restarts**2)

    def recent(self, restart_times: Sequence[float], now: float) -> int:
        return sum(1 for t in restart_times if now - t <= self.window_s)

    def exhausted(self, restart_times: Sequence[float], now: float) -> bool:
        return self.recent(restart_times, now) >= self.max_restarts


class HostHealth(StrEnum):
    UP = "Up"
    SUSPECT = "Suspect"  # connection lost / keepalive missed: maybe only a network blip
    DOWN = "Down"  # unreachable beyond the grace period
    FENCING = "Fencing"
    FENCED = "Fenced"  # powered off beyond doubt: its VMs may run elsewhere
    FENCE_FAILED = "FenceFailed"  # could not be sure: its VMs must NOT be started elsewhere

    def __str__(self) -> str:
        return self.value


_HOST_MOVES: dict[HostHealth, frozenset[HostHealth]] = {
    HostHealth.UP: frozenset({HostHealth.SUSPECT}),
    HostHealth.SUSPECT: frozenset({HostHealth.UP, HostHealth.DOWN}),
    HostHealth.DOWN: frozenset({HostHealth.UP, HostHealth.FENCING}),
    HostHealth.FENCING: frozenset({HostHealth.FENCED, HostHealth.FENCE_FAILED}),
    HostHealth.FENCED: frozenset({HostHealth.UP, HostHealth.FENCE_FAILED}),  # a live copy proved it wrong
    HostHealth.FENCE_FAILED: frozenset({HostHealth.UP, HostHealth.FENCING}),
}


def host_move_allowed(current: HostHealth, new: HostHealth) -> bool:
    return new in _HOST_MOVES[current]


def may_start_elsewhere(host_health: HostHealth) -> bool:
    """Never two copies: a VM of a host that stopped answering may run elsewhere only once that host is fenced."""
    return host_health in (HostHealth.UP, HostHealth.FENCED)


def evacuation_order(vms: Sequence[tuple[str, int]]) -> list[str]:
    """(name, ha priority) pairs, highest priority first, then by name for a stable order."""
    return [name for name, _ in sorted(vms, key=lambda v: (-v[1], v[0]))]
