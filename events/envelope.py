"""The envelope: what an appender gives (NewEvent) and what the log returns (StoredEvent, AppendResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

ANY_VERSION = -1
"""expected_version meaning: append whatever the stream's current version is."""
NO_STREAM = 0
"""expected_version meaning: the stream must not exist yet."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us_to_datetime(us: int) -> datetime:
    """Microseconds since the Unix epoch (as stored) -> aware UTC datetime."""
    return EPOCH + timedelta(microseconds=us)


def datetime_to_us(dt: datetime) -> int:
    """Aware datetime -> microseconds since the Unix epoch. Naive datetimes are refused."""
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. `payload` must be JSON-serialisable (no NaN/Infinity)."""

    event_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    schema_version: int = 1
    actor: str = "system"
    causation_id: str | None = None
    correlation_id: str | None = None


class StoredEvent(NamedTuple):
    """An event as recorded. `payload` (and `schema_version`) are after upcasting; `prev_hash`/`hash` are
    the chain link of the stored row."""

    position: int
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    recorded_at: datetime
    actor: str
    command_id: str | None
    causation_id: str | None
    correlation_id: str | None
    payload: dict[str, Any]
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of one append. `duplicate` is True when the command id had already been appended and this
    result is the original one (nothing was written)."""

    events: tuple[StoredEvent, ...]
    last_position: int
    stream_version: int
    duplicate: bool = False

    @property
    def stream_id(self) -> str:
        return self.events[0].stream_id if self.events else ""

    @property
    def first_position(self) -> int:
        return self.events[0].position if self.events else self.last_position


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A projection's state at `position`, with the log's head hash there (to detect a changed log)."""

    name: str
    position: int
    head_hash: bytes
    state: dict[str, Any]
    created_at: datetime
