from __future__ import annotations

import pytest

from moldd.domain.errors import ValidationError
from moldd.domain.reconcile import reconcile
from moldd.domain.settings import validate_details
from moldd.domain.states import VMState

S = VMState


@pytest.mark.parametrize(
    ("state", "domain", "stale", "expected"),
    [
        (S.RUNNING, "running", False, None),
        (S.RUNNING, "shutoff", False, S.STOPPED),
        (S.RUNNING, None, False, S.STOPPED),
        (S.STOPPED, "running", False, S.RUNNING),
        (S.STOPPED, "shutoff", False, None),
        (S.STARTING, "running", True, S.RUNNING),
        (S.STARTING, "shutoff", True, S.STOPPED),
        (S.STARTING, "shutoff", False, None),  # a live job will record the outcome itself
        (S.STOPPING, None, True, S.STOPPED),
        (S.CREATING, None, True, S.ERROR),
        (S.DESTROYING, "shutoff", True, S.DESTROYED),
        (S.EXPUNGING, None, True, S.DESTROYED),
        (S.UNKNOWN, "shutoff", False, S.STOPPED),
        (S.DESTROYED, None, False, None),
    ],
)
def test_reconcile_records_only_real_differences(
    state: VMState, domain: str | None, stale: bool, expected: VMState | None
) -> None:
    finding = reconcile(state, domain, stale_job=stale)
    assert (finding.state if finding else None) == expected
    if finding is not None:
        assert finding.reason


def test_found_stopped_is_a_cause_ha_acts_on() -> None:
    finding = reconcile(S.RUNNING, "shutoff", stale_job=False)
    assert finding is not None and finding.stop_cause == "found-stopped"


def test_settings_are_validated_and_normalised() -> None:
    out = validate_details(
        {"boot_order": "cdrom, hd", "cpu_model": "qemu64", "vnc_password": "s3cret", "machine": None}
    )
    assert out == {
        "boot_order": ["cdrom", "hd"],
        "cpu_model": "qemu64",
        "vnc_password": "s3cret",
        "machine": None,
    }


@pytest.mark.parametrize(
    ("details", "field"),
    [({"colour": "red"}, "details.colour"), ({"boot_order": "hd,floppy"}, "details.boot_order"),
     ({"boot_order": "hd,hd"}, "details.boot_order"), ({"cpu_model": "host-model"}, "details.cpu_model"),
     ({"vnc_password": "toolongpassword"}, "details.vnc_password"), ({"disk_bus": "scsi"}, "details.disk_bus"),
     ({"kernel_args": "x\x00"}, "details.kernel_args")],
)  # fmt: skip
def test_bad_settings_name_the_field(details: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        validate_details(details)
    assert refused.value.field == field


def test_settings_combinations_are_refused_naming_the_setting() -> None:
    import pytest

    from moldd.domain.errors import ValidationError
    from moldd.domain.settings import check_combination

    cases = [
        ({"machine": "q35", "disk_bus": "ide"}, False, "details.disk_bus"),
        ({"machine": "pc-q35-8.2", "disk_bus": "ide"}, False, "details.disk_bus"),
        ({"boot_order": ["hd"]}, True, "details.boot_order"),
        ({"kernel_args": "console=ttyS0"}, False, "details.kernel_args"),
        ({"boot_mode": "uefi"}, True, "details.boot_mode"),
    ]
    for details, kernel_boot, field in cases:
        with pytest.raises(ValidationError) as info:
            check_combination(details, kernel_boot=kernel_boot, template="t")
        assert info.value.field == field
    check_combination({"machine": "q35", "disk_bus": "sata", "kernel_args": "x"}, kernel_boot=True, template="t")
    check_combination({"machine": "pc", "disk_bus": "ide", "boot_order": ["cdrom", "hd"]}, kernel_boot=False, template=None)
