"""Which failed (re)starts are the VM's own (they use up its restart budget) and CloudStack's event names."""

from __future__ import annotations

import pytest

from moldd.domain.ha import blame_elsewhere
from moldd.eventtypes import EVENT_TYPES, cloudstack_event


@pytest.mark.parametrize(
    "message",
    [
        'internal error: process exited while connecting to monitor: Failed to get "write" lock',
        "internal error: qemu unexpectedly closed the monitor: Failed to bind socket: Address already in use",
        "host host0 is not connected",
        "host host1 did not answer within 10 s (start i-2-1-VM)",
    ],
)
def test_failures_of_the_host_or_a_live_copy_are_not_the_vms(message: str) -> None:
    assert blame_elsewhere(message) is not None


@pytest.mark.parametrize("message", ["internal error: qemu unexpectedly closed the monitor: kernel panic", ""])
def test_failures_of_the_vm_itself_count(message: str) -> None:
    assert blame_elsewhere(message) is None


def test_cloudstack_names_of_the_lifecycle() -> None:
    assert cloudstack_event("vm.deploy.requested") == ("VM.CREATE", "Scheduled")
    assert cloudstack_event("vm.created") == ("VM.CREATE", "Completed")
    assert cloudstack_event("vm.stop.failed") == ("VM.STOP", "Error")
    assert cloudstack_event("vmsnapshot.revert.requested") == ("VMSNAPSHOT.REVERTTO", "Scheduled")
    assert cloudstack_event("libvirt.domain_event") is None
    for t in EVENT_TYPES:  # every name given is for a known type, and well formed
        name = cloudstack_event(t)
        assert name is None or (name[0].isupper() and name[1] in ("Scheduled", "Started", "Completed", "Error"))
