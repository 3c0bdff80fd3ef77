"""Typed errors of the event log: a stable code, a message a person can act on, the field at fault."""

from __future__ import annotations


class EventLogError(Exception):
    """Base of every error the event log raises."""

    code = "event_log_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class ConcurrencyError(EventLogError):
    """The stream is not at the version the appender expected (someone else appended first)."""

    code = "concurrency_conflict"

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, the append expected version {expected}",
            field="expected_version",
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class InvalidEventError(EventLogError):
    """An argument is malformed (empty stream id or event type, bad version, negative limit...)."""

    code = "invalid_event"


class PayloadError(InvalidEventError):
    """A payload cannot be stored: not JSON-serialisable, NaN/Infinity, or larger than the limit."""

    code = "invalid_payload"

    def __init__(self, message: str, *, index: int, event_type: str, reason: str) -> None:
        super().__init__(message, field=f"events[{index}].payload")
        self.index = index
        self.event_type = event_type
        self.reason = reason


class NotALogError(EventLogError):
    """The file is not an event log of this library (or of a newer, unknown format)."""

    code = "not_a_log"


class StoreClosedError(EventLogError):
    """The store was closed; no more appends or reads."""

    code = "store_closed"


class CheckpointError(EventLogError):
    """A key or checkpoint file cannot be read or written."""

    code = "checkpoint_error"


class LogIntegrityError(EventLogError):
    """The log does not verify: a row's hash, link or position is wrong, or it differs from a checkpoint."""

    code = "log_tampered"

    def __init__(self, message: str, *, position: int | None, kind: str) -> None:
        super().__init__(message, field="log")
        self.position = position
        self.kind = kind


class FencedError(EventLogError):
    """The database refused a write: this writer's fencing epoch is no longer the log's current one (another
    process took the lead), or it holds none on a log that has one."""

    code = "fenced"
