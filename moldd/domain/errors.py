"""Errors a person can act on: a stable code, a message, the field at fault. No HTTP here: the API maps each
class to its status (``moldd.api.handlers.http_status``)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class MolddError(Exception):
    """Base of every error moldd reports to a client."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class ValidationError(MolddError):
    """The request itself is wrong: a missing, malformed or out-of-range argument."""

    code = "invalid_argument"


class NotFound(MolddError):
    code = "not_found"


class InvalidState(MolddError):
    """The command is not allowed in the object's current state; the message names the state and rule."""

    code = "invalid_state"


class Conflict(MolddError):
    """Another change won a race, or a unique name is taken."""

    code = "conflict"


class CapacityError(MolddError):
    code = "insufficient_capacity"


class PermissionDenied(MolddError):
    code = "permission_denied"


class Unavailable(MolddError):
    """A host or the hypervisor cannot be reached right now; retrying later may work."""

    code = "unavailable"


class OperationFailed(MolddError):
    """libvirt or a tool refused or failed the operation."""

    code = "operation_failed"


class NotLeader(Unavailable):
    """This moldd is a standby (another node leads the cluster): it answers reads, writes go to the leader."""

    code = "not_leader"


class InternalError(MolddError):
    """A broken invariant of moldd itself (a bug, not the caller's fault). Raised by explicit checks where an
    ``assert`` would vanish under ``python -O``."""

    code = "internal_error"


def present(value: T | None, what: str) -> T:
    """``value``, which moldd's own invariants guarantee is set; ``InternalError`` naming ``what`` if it is None."""
    if value is None:
        raise InternalError(f"internal error: {what} is not set")
    return value
