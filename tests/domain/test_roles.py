"""Roles: readonly lists, operator runs VMs, admin does hosts, migration and users; unknown verbs need admin."""

from __future__ import annotations

import pytest

from moldd.domain.errors import ValidationError
from moldd.domain.roles import Role, permits, required_role


@pytest.mark.parametrize("verb", ["listVirtualMachines", "queryAsyncJobResult", "listEvents", "listApis"])
def test_readonly_may_read(verb: str) -> None:
    assert permits(Role.READONLY, verb)


@pytest.mark.parametrize("verb", ["stopVirtualMachine", "deployVirtualMachine", "createVMSnapshot",
                                  "deleteInstanceGroup", "updateVirtualMachine"])  # fmt: skip
def test_operator_runs_vms_readonly_does_not(verb: str) -> None:
    assert permits(Role.OPERATOR, verb)
    assert not permits(Role.READONLY, verb)


@pytest.mark.parametrize("verb", ["confirmHostFenced", "migrateVirtualMachine", "createUser", "listUsers",
                                  "revokeUser", "registerUserKeys", "someFutureVerb"])  # fmt: skip
def test_admin_only(verb: str) -> None:
    assert required_role(verb) is Role.ADMIN
    assert not permits(Role.OPERATOR, verb)
    assert permits(Role.ADMIN, verb)


@pytest.mark.parametrize("text", ["", "root", "Admin ", "superuser", "1"])
def test_unknown_role_is_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        Role.parse(text)
