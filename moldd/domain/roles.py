"""Roles and what each may do: a pure rule over verb names.

``readonly`` may list and query; ``operator`` may also run and manage VMs, groups and snapshots;
``admin`` may do everything, including host operations (``confirmHostFenced``), migration and users.
A verb this table does not know needs ``admin``: a new verb is closed until someone opens it.
"""

from __future__ import annotations

import enum


class Role(enum.IntEnum):
    READONLY = 1
    OPERATOR = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, *, field: str = "role") -> Role:
        from moldd.domain.errors import ValidationError

        try:
            return cls[str(text).upper()]
        except KeyError:
            raise ValidationError(
                f"role must be one of admin, operator, readonly, not {str(text)[:40]!r}", field=field
            ) from None


# Reads that write nothing (besides the audit of a refusal).
_READ_PREFIXES = ("list", "query")
_READ_VERBS = frozenset({"listCapabilities", "listApis"})
# Verbs only an administrator may call: the hosts, moving VMs between them, and who may do what.
ADMIN_VERBS = frozenset(
    {
        "confirmHostFenced",
        "migrateVirtualMachine",
        "createUser",
        "listUsers",
        "revokeUser",
        "registerUserKeys",
    }
)
# VM lifecycle and management: what an operator does all day.
OPERATOR_VERBS = frozenset(
    {
        "deployVirtualMachine", "startVirtualMachine", "stopVirtualMachine", "rebootVirtualMachine",
        "destroyVirtualMachine", "recoverVirtualMachine", "expungeVirtualMachine", "updateVirtualMachine",
        "updateVirtualMachineSettings", "changeServiceForVirtualMachine", "scaleVirtualMachine",
        "resizeVolume", "restoreVirtualMachine", "getVirtualMachineConsole", "attachIso", "detachIso",
        "createVMSnapshot", "revertToVMSnapshot", "deleteVMSnapshot", "createInstanceGroup",
        "deleteInstanceGroup", "updateInstanceGroup",
    }
)  # fmt: skip


def required_role(verb: str) -> Role:
    """The least role that may call ``verb``."""
    if verb in ADMIN_VERBS:
        return Role.ADMIN
    if verb in OPERATOR_VERBS:
        return Role.OPERATOR
    if verb in _READ_VERBS or verb.startswith(_READ_PREFIXES):
        return Role.READONLY
    return Role.ADMIN


def permits(role: Role, verb: str) -> bool:
    return role >= required_role(verb)
