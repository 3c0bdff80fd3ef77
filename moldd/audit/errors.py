"""The one error type of moldd-audit: bad input or a log it cannot check (exit code 2)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FOUND = 1  # tampering (verify) or drift (diff)
EXIT_ERROR = 2  # could not check


class AuditError(Exception):
    """Input the audit cannot work with; ``message`` is one line a person can act on."""

    code = "audit_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
