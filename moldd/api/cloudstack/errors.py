"""CloudStack's error shapes: ``{"<command>response": {"uuidList": [], "errorcode": n, "cserrorcode": m,
"errortext": "..."}}`` with the HTTP status = ``errorcode`` (CloudStack's ``ApiErrorCode``)."""

from __future__ import annotations

from typing import Any

from moldd.domain import errors as e

# ApiErrorCode
UNAUTHORIZED = 401
API_LIMIT_EXCEED = 429
MALFORMED_PARAMETER_ERROR = 430
PARAM_ERROR = 431
UNSUPPORTED_ACTION_ERROR = 432
INTERNAL_ERROR = 530
ACCOUNT_ERROR = 531
INSUFFICIENT_CAPACITY_ERROR = 533
RESOURCE_UNAVAILABLE_ERROR = 534
RESOURCE_IN_USE_ERROR = 536

# CSExceptionErrorCode (the Java exception class CloudStack would have thrown)
CS_CLOUD_RUNTIME = 4250
CS_CONCURRENT_OPERATION = 4300
CS_INSUFFICIENT_CAPACITY = 4325
CS_INVALID_PARAMETER = 4350
CS_PERMISSION_DENIED = 4365
CS_RESOURCE_UNAVAILABLE = 4380
CS_REQUEST_LIMIT = 4545
CS_SERVER_API = 9999


class CloudStackError(Exception):
    def __init__(self, errorcode: int, text: str, cserrorcode: int = CS_SERVER_API) -> None:
        super().__init__(text)
        self.errorcode = errorcode
        self.cserrorcode = cserrorcode
        self.text = text

    def body(self) -> dict[str, Any]:
        return {"uuidList": [], "errorcode": self.errorcode, "cserrorcode": self.cserrorcode,
                "errortext": self.text}  # fmt: skip


def unauthorized() -> CloudStackError:
    # CloudStack's own words; the reason stays in the daemon log (an attacker learns nothing from it).
    return CloudStackError(UNAUTHORIZED, "unable to verify user credentials and/or request signature")


def from_moldd(err: e.MolddError) -> CloudStackError:
    """A moldd refusal as CloudStack would phrase its class of error."""
    if isinstance(err, e.PermissionDenied):
        return CloudStackError(UNSUPPORTED_ACTION_ERROR, err.message, CS_PERMISSION_DENIED)
    text = err.message + (f" (parameter: {err.field})" if err.field else "")
    if isinstance(err, e.ValidationError):
        return CloudStackError(PARAM_ERROR, text, CS_INVALID_PARAMETER)
    if isinstance(err, e.NotFound):
        return CloudStackError(PARAM_ERROR, text, CS_INVALID_PARAMETER)
    if isinstance(err, e.CapacityError):
        return CloudStackError(INSUFFICIENT_CAPACITY_ERROR, text, CS_INSUFFICIENT_CAPACITY)
    if isinstance(err, e.Conflict):
        return CloudStackError(INTERNAL_ERROR, text, CS_CONCURRENT_OPERATION)
    if isinstance(err, e.InvalidState):
        return CloudStackError(INTERNAL_ERROR, text, CS_CLOUD_RUNTIME)
    if isinstance(err, e.Unavailable):
        return CloudStackError(RESOURCE_UNAVAILABLE_ERROR, text, CS_RESOURCE_UNAVAILABLE)
    return CloudStackError(INTERNAL_ERROR, text, CS_CLOUD_RUNTIME)


def job_error(error: dict[str, Any] | None) -> dict[str, Any]:
    """``jobresult`` of a failed job."""
    message = (error or {}).get("message") or "the job failed"
    return {"errorcode": INTERNAL_ERROR, "errortext": str(message)}
