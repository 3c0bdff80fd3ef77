"""events: an append-only, hash-chained, tamper-evident event log (knows nothing of its users)."""

from .checkpoint import Checkpoint, async_checkpoint_store, checkpoint_db, generate_keys, load_checkpoints
from .envelope import ANY_VERSION, NO_STREAM, AppendResult, NewEvent, Snapshot, StoredEvent
from .errors import (
    CheckpointError,
    ConcurrencyError,
    EventLogError,
    FencedError,
    InvalidEventError,
    LogIntegrityError,
    NotALogError,
    PayloadError,
    StoreClosedError,
)
from .memory import MemoryEventStore
from .replay import Projection, Replayed, async_fold, async_replay
from .sqlite import SQLiteEventStore
from .store import EventStore
from .upcast import Upcasters
from .verify import VerifyReport, verify

__all__ = [
    "ANY_VERSION",
    "NO_STREAM",
    "AppendResult",
    "Checkpoint",
    "CheckpointError",
    "ConcurrencyError",
    "EventLogError",
    "EventStore",
    "FencedError",
    "InvalidEventError",
    "LogIntegrityError",
    "MemoryEventStore",
    "NewEvent",
    "NotALogError",
    "PayloadError",
    "Projection",
    "Replayed",
    "SQLiteEventStore",
    "Snapshot",
    "StoreClosedError",
    "StoredEvent",
    "Upcasters",
    "VerifyReport",
    "async_checkpoint_store",
    "async_fold",
    "async_replay",
    "checkpoint_db",
    "generate_keys",
    "load_checkpoints",
    "verify",
]
