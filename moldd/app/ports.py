"""The seams of the application layer: what ``App`` needs of the event log and of the hosts, as Protocols.

They are defined here, by the layer that uses them (the adapters satisfy them structurally):
``events.EventStore`` (SQLite or PostgreSQL) is an ``EventLog``; ``moldd.app.hosts.HostManager`` is a
``Hosts``. Tests may pass anything with these methods. The read model is the concrete
``moldd.projection.readmodel.ReadModel`` (a pure fold of the log, no I/O), reached through ``App.model``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

from events import ANY_VERSION, AppendResult, NewEvent, StoredEvent

if TYPE_CHECKING:
    from moldd.libvirt.host import HostConnection


class EventLog(Protocol):
    """The event store as the application uses it: append (the acknowledgement point), read, follow."""

    @property
    def log_id(self) -> str: ...

    async def async_append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int = ANY_VERSION,
        command_id: str | None = None,
    ) -> AppendResult: ...

    async def async_head(self) -> tuple[int, bytes]: ...

    async def async_find_command(self, command_id: str) -> AppendResult | None: ...

    async def async_read(
        self, from_position: int = 1, to_position: int | None = None, limit: int | None = None
    ) -> list[StoredEvent]: ...

    async def async_read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]: ...

    async def async_read_correlated(
        self, correlation_id: str, from_position: int = 1, limit: int | None = None
    ) -> list[StoredEvent]: ...

    def async_subscribe(
        self, from_position: int = 1, *, batch_size: int = 1000, queue_limit: int | None = None
    ) -> AsyncIterator[StoredEvent]: ...


class Hosts(Protocol):
    """The hosts as the application uses them: a live connection per host (``Unavailable`` if not connected)."""

    def conn(self, name: str | None) -> HostConnection: ...

    def is_connected(self, name: str) -> bool: ...

    async def async_forget_domain(self, host: str, domain: str) -> None: ...

    async def async_after_crash(self, name: str, job: str) -> None: ...
