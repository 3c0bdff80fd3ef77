"""EventStore: the API every backend offers, and the logic they share (validation, chain, writer)."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from .canonical import canonical_json, canonical_text, loads
from .chain import encode_fields, genesis_hash
from .envelope import (
    ANY_VERSION,
    AppendResult,
    NewEvent,
    Snapshot,
    StoredEvent,
    datetime_to_us,
    us_to_datetime,
)
from .errors import InvalidEventError, PayloadError, StoreClosedError
from .subscription import Subscriber, async_subscribe
from .upcast import Upcasters
from .writer import AppendRequest, CommandRow, GroupWriter, PreparedEvent, Row

DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
Clock = Callable[[], int]
"""Microseconds since the Unix epoch (UTC)."""
SnapshotRow = tuple[int, bytes, bytes, int]
"""(position, head_hash, state as canonical JSON, created_at_us) as a backend stores a snapshot."""
_new_tuple = tuple.__new__  # StoredEvent(*fields) etc. without the NamedTuple's Python-level __new__


def system_clock_us() -> int:
    """Wall-clock time in microseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1000


def _check_str(value: object, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise InvalidEventError(f"{name} must be a non-empty string, got {value!r}", field=name)
    if "\x00" in value:
        raise InvalidEventError(f"{name} must not contain NUL characters", field=name)


def _check_count(value: object, name: str, *, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise InvalidEventError(f"{name} must be an int >= {minimum}, got {value!r}", field=name)


class EventStore(abc.ABC):
    """An append-only, hash-chained event log. Backends implement storage; this class does the rest."""

    log_id: str

    def __init__(
        self,
        *,
        log_id: str,
        head_position: int,
        head_hash: bytes,
        last_recorded_us: int,
        upcasters: Upcasters | None,
        max_payload_bytes: int,
        clock: Clock | None,
        subscriber_queue_limit: int,
    ) -> None:
        self.log_id = log_id
        self.upcasters = upcasters
        self.max_payload_bytes = max_payload_bytes
        self.subscriber_queue_limit = subscriber_queue_limit
        self._subscribers: set[Subscriber] = set()
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None
        self._writer = GroupWriter(
            self,
            head_position=head_position,
            head_hash=head_hash,
            last_recorded_us=last_recorded_us,
            clock=clock or system_clock_us,
            make_event=self._make_event,
            publish=self._publish,
        )

    # ---- backend hooks -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _async_lookup(
        self, stream_ids: set[str], command_ids: set[str]
    ) -> tuple[dict[str, int], dict[str, AppendResult]]: ...

    @abc.abstractmethod
    async def _async_commit(self, rows: list[Row], commands: list[CommandRow]) -> None: ...

    @abc.abstractmethod
    async def _async_read_rows(
        self, kind: str, key: Any, start: int, end: int | None, limit: int | None
    ) -> list[Row]:
        """kind: "stream" (key = stream id, start/end = versions), "position" (start/end = positions) or
        "since" (start = recorded_at_us)."""

    @abc.abstractmethod
    async def _async_hash_at(self, position: int) -> bytes | None:
        """The stored hash of the row at `position` (>= 1), or None if there is none."""

    @abc.abstractmethod
    async def _async_put_snapshot(self, name: str, snapshot: SnapshotRow) -> None:
        """Store the snapshot `name`, replacing the previous one."""

    @abc.abstractmethod
    async def _async_get_snapshot(self, name: str) -> SnapshotRow | None: ...

    async def _async_close_backend(self) -> None:
        return None

    async def async_release_memory(self) -> None:
        """Give back what the backend caches and can read again (after a bulk read: a replay at start-up fills
        the page cache with the whole log). Nothing by default."""
        return None

    # ---- appends ---------------------------------------------------------------------------------------
    def _prepare(
        self, stream_id: str, events: Sequence[NewEvent], command_id: str | None
    ) -> list[PreparedEvent]:
        # Fast paths first (exact str, non-empty, no NUL); anything else goes through _check_str, which
        # accepts what it always accepted and raises the detailed error.
        if not (type(stream_id) is str and stream_id and "\x00" not in stream_id):
            _check_str(stream_id, "stream_id")
        if command_id is not None and not (type(command_id) is str and command_id and "\x00" not in command_id):
            _check_str(command_id, "command_id", allow_none=True)
        if isinstance(events, NewEvent) or not events:
            raise InvalidEventError("events must be a non-empty sequence of NewEvent", field="events")
        limit = self.max_payload_bytes
        prepared: list[PreparedEvent] = []
        for i, ev in enumerate(events):
            if type(ev) is not NewEvent and not isinstance(ev, NewEvent):
                raise InvalidEventError(f"events[{i}] is not a NewEvent: {ev!r}", field=f"events[{i}]")
            et = ev.event_type
            actor = ev.actor
            caus = ev.causation_id
            corr = ev.correlation_id
            if not (
                type(et) is str
                and et
                and "\x00" not in et
                and type(actor) is str
                and actor
                and "\x00" not in actor
                and (caus is None or (type(caus) is str and caus and "\x00" not in caus))
                and (corr is None or (type(corr) is str and corr and "\x00" not in corr))
            ):
                _check_str(et, f"events[{i}].event_type")
                _check_str(actor, f"events[{i}].actor")
                _check_str(caus, f"events[{i}].causation_id", allow_none=True)
                _check_str(corr, f"events[{i}].correlation_id", allow_none=True)
            sv = ev.schema_version
            if type(sv) is not int or not 1 <= sv < 2**31:
                raise InvalidEventError(
                    f"events[{i}].schema_version must be an int >= 1, got {sv!r}",
                    field=f"events[{i}].schema_version",
                )
            payload = ev.payload
            if not isinstance(payload, dict):
                raise PayloadError(
                    f"payload of event {i} ({et!r}) must be a JSON object (dict), got {type(payload).__name__}",
                    index=i,
                    event_type=et,
                    reason="not_an_object",
                )
            try:
                text = canonical_text(payload)
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a ValueError too: must come first
                raise PayloadError(
                    f"payload of event {i} ({et!r}) contains text that is not valid Unicode: {exc}",
                    index=i,
                    event_type=et,
                    reason="not_serialisable",
                ) from exc
            except ValueError as exc:
                reason = "nan_or_infinity" if "Out of range float" in str(exc) else "not_serialisable"
                raise PayloadError(
                    f"payload of event {i} ({et!r}) cannot be stored as JSON: {exc}",
                    index=i,
                    event_type=et,
                    reason=reason,
                ) from exc
            except (TypeError, RecursionError) as exc:
                raise PayloadError(
                    f"payload of event {i} ({et!r}) is not JSON-serialisable: {exc}",
                    index=i,
                    event_type=et,
                    reason="not_serialisable",
                ) from exc
            if len(data) > limit:
                raise PayloadError(
                    f"payload of event {i} ({et!r}) is {len(data)} bytes, over the limit of {limit}",
                    index=i,
                    event_type=et,
                    reason="too_large",
                )
            try:
                fields = encode_fields(stream_id, et, actor, command_id, caus, corr)
            except UnicodeEncodeError as exc:
                raise InvalidEventError(f"event {i} has a field that is not valid Unicode: {exc}") from exc
            # the payload handed back (StoredEvent.payload) is decoded from the stored text, so it is exactly
            # what a later read returns and shares nothing with the caller's NewEvent; it is shared by the
            # AppendResult, a retry's duplicate result and live subscribers: treat it as read-only
            prepared.append(_new_tuple(PreparedEvent, (et, sv, actor, caus, corr, fields, data, loads(text))))
        return prepared

    async def async_append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int = ANY_VERSION,
        command_id: str | None = None,
    ) -> AppendResult:
        """Append `events` to `stream_id` atomically; returns after COMMIT.

        expected_version: the stream's current version (NO_STREAM == 0: must not exist) or ANY_VERSION.
        command_id: idempotency key; a retry returns the original result with duplicate=True.
        Raises ConcurrencyError, PayloadError/InvalidEventError (nothing written), StoreClosedError, or
        what the COMMIT raised (nothing of the whole group written). Cancelling the caller does not withdraw
        an append that was already queued.
        """
        if self._closed:
            raise StoreClosedError("the event store is closed")
        if type(expected_version) is not int or expected_version < ANY_VERSION:
            raise InvalidEventError(
                f"expected_version must be an int >= 0 or ANY_VERSION, got {expected_version!r}",
                field="expected_version",
            )
        prepared = self._prepare(stream_id, events, command_id)
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._writer.submit(_new_tuple(AppendRequest, (stream_id, prepared, expected_version, command_id, fut)))
        return await fut

    # ---- reads -----------------------------------------------------------------------------------------
    def _make_event(
        self, row: Row, payload: dict[str, Any], recorded_at: datetime | None = None
    ) -> StoredEvent:
        schema_version = row[4]
        up = self.upcasters
        if up is not None and up.needs_upcast(row[3], schema_version):
            schema_version, payload = up.upcast(row[3], schema_version, payload)
        return _new_tuple(
            StoredEvent,
            (
                row[0],
                row[1],
                row[2],
                row[3],
                schema_version,
                recorded_at if recorded_at is not None else us_to_datetime(row[5]),
                row[6],
                row[7],
                row[8],
                row[9],
                payload,
                row[11],
                row[12],
            ),
        )

    def _rows_to_events(self, rows: list[Row]) -> list[StoredEvent]:
        make = self._make_event
        return [make(r, loads(r[10])) for r in rows]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the event store is closed")

    def _check_range(self, limit: int | None) -> None:
        self._check_open()
        if limit is not None:
            _check_count(limit, "limit", minimum=0)

    async def async_read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        """Events of one stream, from_version..to_version inclusive, in order."""
        self._check_range(None)
        return self._rows_to_events(
            await self._async_read_rows("stream", stream_id, from_version, to_version, None)
        )

    async def async_read(
        self, from_position: int = 1, to_position: int | None = None, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events by global position, from_position..to_position inclusive, at most `limit`."""
        self._check_range(limit)
        return self._rows_to_events(
            await self._async_read_rows("position", None, from_position, to_position, limit)
        )

    async def async_read_rows(self, from_position: int = 1, limit: int | None = None) -> list[Row]:
        """The stored rows ``async_read(from_position, limit=limit)`` would turn into events, undecoded: the
        storage column order (position, stream_id, stream_version, event_type, schema_version, recorded_at in
        microseconds, actor, command_id, causation_id, correlation_id, payload as stored JSON, prev_hash, hash).
        For readers that decode only what they use (the read model's restore: no datetime per event); upcasting
        the payloads (``self.upcasters``) is theirs."""
        self._check_range(limit)
        return await self._async_read_rows("position", None, from_position, None, limit)

    async def async_read_since(self, since: datetime, limit: int | None = None) -> list[StoredEvent]:
        """Events recorded at or after `since` (aware datetime), in position order."""
        self._check_range(limit)
        return self._rows_to_events(
            await self._async_read_rows("since", None, datetime_to_us(since), None, limit)
        )

    async def async_head(self) -> tuple[int, bytes]:
        """(last committed position or 0, head hash)."""
        return self._writer.head_position, self._writer.head_hash

    async def async_find_command(self, command_id: str) -> AppendResult | None:
        """The result of the append made with `command_id`, if any."""
        self._check_open()
        _, found = await self._async_lookup(set(), {command_id})
        return found.get(command_id)

    async def async_read_correlated(
        self, correlation_id: str, from_position: int = 1, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events whose `correlation_id` or `command_id` is `correlation_id`, from `from_position` on, in
        position order, at most `limit`. This generic version scans the log in pages; a backend with an index
        overrides it."""
        self._check_range(limit)
        out: list[StoredEvent] = []
        position = max(1, from_position)
        while limit is None or len(out) < limit:
            page = await self.async_read(position, limit=1000)
            out += [e for e in page if correlation_id in (e.correlation_id, e.command_id)]
            if len(page) < 1000:
                break
            position = page[-1].position + 1
        return out if limit is None else out[:limit]

    def async_subscribe(
        self, from_position: int = 1, *, batch_size: int = 1000, queue_limit: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Catch up from `from_position`, then yield new events as they commit (no gap, no duplicate).

        At most `queue_limit` (default: the store's `subscriber_queue_limit`) committed events wait for a slow
        subscriber; past that it catches up from the store again, `batch_size` events at a time.
        The iterator ends when the store is closed.
        """
        self._check_open()
        _check_count(batch_size, "batch_size", minimum=1)
        if queue_limit is not None:
            _check_count(queue_limit, "queue_limit", minimum=1)

        async def read(start: int, n: int) -> list[StoredEvent]:
            if self._closed:
                return []
            return await self.async_read(start, limit=n)

        return async_subscribe(
            read,
            self._register,
            self._subscribers.discard,
            from_position,
            batch_size=batch_size,
            queue_limit=self.subscriber_queue_limit if queue_limit is None else queue_limit,
        )

    def _register(self, sub: Subscriber) -> None:
        self._subscribers.add(sub)
        if self._closed:
            sub.close()

    def _publish(self, events: list[StoredEvent]) -> None:
        for sub in self._subscribers:
            sub.push(events)

    # ---- snapshots -------------------------------------------------------------------------------------
    async def async_hash_at(self, position: int) -> bytes | None:
        """The chain hash at `position` (the genesis hash at 0), or None where the log has no row."""
        self._check_open()
        if position == 0:
            return genesis_hash(self.log_id)
        return await self._async_hash_at(position) if position > 0 else None

    async def async_save_snapshot(self, name: str, position: int, state: dict[str, Any]) -> Snapshot:
        """Store `state` as the snapshot `name` at `position` with the head hash there (replacing the
        previous one). Raises ValueError if the log ends before `position`."""
        head_hash = await self.async_hash_at(position)
        if head_hash is None:
            raise ValueError(f"cannot snapshot at position {position}: the log ends before it")
        data = canonical_json(state)
        now = system_clock_us()
        await self._async_put_snapshot(name, (position, head_hash, data, now))
        return Snapshot(name, position, head_hash, loads(data), us_to_datetime(now))

    async def async_save_snapshot_data(self, name: str, position: int, data: bytes) -> None:
        """``async_save_snapshot`` for a state the caller already encoded as canonical JSON (e.g. off the event
        loop, in pieces): stored as is, not decoded again. Raises ValueError if the log ends before `position`."""
        head_hash = await self.async_hash_at(position)
        if head_hash is None:
            raise ValueError(f"cannot snapshot at position {position}: the log ends before it")
        await self._async_put_snapshot(name, (position, head_hash, data, system_clock_us()))

    async def async_load_snapshot(self, name: str) -> Snapshot | None:
        """The snapshot `name` as stored (events.snapshot.async_load_valid_snapshot also checks its hash)."""
        self._check_open()
        snap = await self._async_get_snapshot(name)
        if snap is None:
            return None
        position, head_hash, data, created_us = snap
        return Snapshot(name, position, bytes(head_hash), loads(data), us_to_datetime(created_us))

    # ---- closing ---------------------------------------------------------------------------------------
    async def async_close(self) -> None:
        """Finish queued appends, end subscriptions, release the storage. Every caller (also concurrent
        ones) returns once all of that is done."""
        if self._close_task is None:
            self._writer.stop_accepting()  # at once: no append is accepted once close() was called
            self._close_task = asyncio.ensure_future(self._async_close())
        await asyncio.shield(self._close_task)

    async def _async_close(self) -> None:
        await self._writer.async_close()
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()
        await self._async_close_backend()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.async_close()
