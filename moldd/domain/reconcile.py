"""What to record when libvirt's view of a VM differs from the log's: after a reconnect, or after the daemon
itself crashed mid-command. Pure: the caller supplies the facts."""

from __future__ import annotations

from dataclasses import dataclass

from moldd.domain.states import VMState

S = VMState
_ON = frozenset({"running", "paused", "blocked", "pmsuspended"})


@dataclass(frozen=True)
class Finding:
    state: VMState
    power_state: str
    reason: str
    stop_cause: str | None = None


def is_on(domain_state: str | None) -> bool:
    return domain_state in _ON


def reconcile(state: VMState, domain_state: str | None, *, stale_job: bool) -> Finding | None:
    """``domain_state`` is libvirt's state of the VM's domain on the host moldd has it on (None: no such domain).
    ``stale_job``: the VM is in an in-progress state but no command is running for it in this daemon (it died
    mid-command). Returns None when the log already agrees."""
    on = is_on(domain_state)
    seen = domain_state or "absent"
    if on:
        if state in (S.STOPPED, S.CREATED, S.UNKNOWN, S.ERROR):
            return Finding(S.RUNNING, "on", f"domain is {seen} although the log said {state.value}")
        if stale_job and state in (S.STARTING, S.STOPPING, S.DESTROYING, S.MIGRATING):
            return Finding(S.RUNNING, "on", f"interrupted while {state.value}; domain is {seen}")
        return None
    if state is S.RUNNING:
        return Finding(S.STOPPED, "off", f"domain is {seen} although the log said Running", "found-stopped")
    if state is S.UNKNOWN:
        return Finding(S.STOPPED, "off", f"domain is {seen}", "found-stopped")
    if not stale_job:
        return None
    if state in (S.STARTING, S.STOPPING, S.MIGRATING):
        return Finding(S.STOPPED, "off", f"interrupted while {state.value}; domain is {seen}")
    if state is S.CREATING:
        return Finding(S.ERROR, "off", "deploy interrupted before it finished; destroy and deploy again")
    if state in (S.DESTROYING, S.EXPUNGING):
        return Finding(S.DESTROYED, "off", f"interrupted while {state.value}; domain is {seen}")
    return None
