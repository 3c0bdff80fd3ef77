"""Errors a person can act on: a stable code, a message, the field at fault, an HTTP status."""

from __future__ import annotations


class MolddError(Exception):
    """Base of every error moldd reports to a client."""

    code = "error"
    http_status = 500

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
    http_status = 400


class NotFound(MolddError):
    code = "not_found"
    http_status = 404


class InvalidState(MolddError):
    """The command is not allowed in the object's current state; the message names the state and rule."""

    code = "invalid_state"
    http_status = 409


class Conflict(MolddError):
    """Another change won a race, or a unique name is taken."""

    code = "conflict"
    http_status = 409


class CapacityError(MolddError):
    code = "insufficient_capacity"
    http_status = 409


class PermissionDenied(MolddError):
    code = "permission_denied"
    http_status = 403


class Unavailable(MolddError):
    """A host or the hypervisor cannot be reached right now; retrying later may work."""

    code = "unavailable"
    http_status = 503


class OperationFailed(MolddError):
    """libvirt or a tool refused or failed the operation."""

    code = "operation_failed"
    http_status = 502


class NotLeader(Unavailable):
    """This moldd is a standby (another node leads the cluster): it answers reads, writes go to the leader."""

    code = "not_leader"
    http_status = 503
