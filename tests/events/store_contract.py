"""The store contract, written once; every backend's tests subclass StoreContract and override `store`."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from events import (
    ANY_VERSION,
    NO_STREAM,
    ConcurrencyError,
    EventStore,
    InvalidEventError,
    NewEvent,
    PayloadError,
    StoreClosedError,
    StoredEvent,
    Upcasters,
    async_fold,
)
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.envelope import datetime_to_us, us_to_datetime
from events.replay import async_replay


def ev(event_type: str = "thing.happened", **payload: Any) -> NewEvent:
    return NewEvent(event_type, payload, actor="tester")


class CountingProjection:
    """Counts events per stream and keeps the last payload per stream."""

    def initial(self) -> dict[str, Any]:
        return {"count": 0, "streams": {}}

    def apply(self, state: dict[str, Any], event: StoredEvent) -> dict[str, Any]:
        streams = dict(state["streams"])
        streams[event.stream_id] = {"version": event.stream_version, "last": event.payload}
        return {"count": state["count"] + 1, "streams": streams}

    def to_snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    def from_snapshot(self, data: dict[str, Any]) -> dict[str, Any]:
        return data


def hold_writer_before_commit(store: EventStore) -> tuple[asyncio.Event, asyncio.Event]:
    """(entered, gate): the writer's next group sets `entered`, then waits for `gate` before its COMMIT."""
    entered, gate = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        entered.set()
        await gate.wait()

    store._writer.before_commit = hold
    return entered, gate


class StoreContract:
    """Behaviour every EventStore backend must show."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[EventStore]:
        s = await self.make_store()
        yield s
        await s.async_close()

    async def make_store(self, **kw: Any) -> EventStore:
        """A fresh store with options (upcasters, max_payload_bytes, subscriber_queue_limit)."""
        raise NotImplementedError

    # ---- appends ---------------------------------------------------------------------------------
    async def test_append_assigns_gap_free_positions_and_stream_versions(self, store: EventStore) -> None:
        r1 = await store.async_append("s-1", [ev(n=1), ev(n=2)])
        r2 = await store.async_append("s-2", [ev(n=3)])
        r3 = await store.async_append("s-1", [ev(n=4)])
        assert [e.position for e in r1.events] == [1, 2]
        assert [e.stream_version for e in r1.events] == [1, 2]
        assert (r2.last_position, r2.stream_version) == (3, 1)
        assert (r3.last_position, r3.stream_version, r3.duplicate) == (4, 3, False)
        assert [e.position for e in await store.async_read()] == [1, 2, 3, 4]

    async def test_envelope_fields_are_stored_and_read_back(self, store: EventStore) -> None:
        new = NewEvent("vm.start", {"host": "h1", "n": [1, 2]}, schema_version=1, actor="uid=0",
                       causation_id="cause-1", correlation_id="job-1")
        res = await store.async_append("vm-a", [new], command_id="cmd-1")
        (got,) = await store.async_read_stream("vm-a")
        assert got == res.events[0]
        assert (got.event_type, got.actor, got.command_id) == ("vm.start", "uid=0", "cmd-1")
        assert (got.causation_id, got.correlation_id) == ("cause-1", "job-1")
        assert got.payload == {"host": "h1", "n": [1, 2]}
        assert got.recorded_at.tzinfo is not None and got.recorded_at.utcoffset() == timedelta(0)

    async def test_expected_version_conflict_is_a_typed_error(self, store: EventStore) -> None:
        await store.async_append("s", [ev(), ev()], expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError) as info:
            await store.async_append("s", [ev()], expected_version=1)
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 1, 2)
        assert len(await store.async_read_stream("s")) == 2

    async def test_no_stream_refuses_an_existing_stream(self, store: EventStore) -> None:
        await store.async_append("s", [ev()], expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError):
            await store.async_append("s", [ev()], expected_version=NO_STREAM)

    async def test_concurrent_appends_at_same_version_exactly_one_wins(self, store: EventStore) -> None:
        await store.async_append("s", [ev()])
        results = await asyncio.gather(
            *(store.async_append("s", [ev(i=i)], expected_version=1) for i in range(10)), return_exceptions=True
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, ConcurrencyError)]
        assert len(wins) == 1 and len(losses) == 9
        assert [e.stream_version for e in await store.async_read_stream("s")] == [1, 2]

    async def test_a_failing_request_does_not_fail_the_others_in_its_group(self, store: EventStore) -> None:
        await store.async_append("a", [ev()])
        results = await asyncio.gather(
            store.async_append("b", [ev()]),
            store.async_append("a", [ev()], expected_version=5),
            store.async_append("c", [ev()], expected_version=NO_STREAM),
            return_exceptions=True,
        )
        assert isinstance(results[1], ConcurrencyError)
        assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
        assert [e.stream_id for e in await store.async_read()] == ["a", "b", "c"]

    async def test_retried_command_id_returns_original_result_and_writes_nothing(self, store: EventStore) -> None:
        first = await store.async_append("s", [ev(n=1), ev(n=2)], command_id="cmd-1")
        again = await store.async_append("s", [ev(n=99)], expected_version=0, command_id="cmd-1")
        assert again.duplicate is True and first.duplicate is False
        assert again.events == first.events and again.last_position == first.last_position
        assert len(await store.async_read()) == 2
        found = await store.async_find_command("cmd-1")
        assert found is not None and found.events == first.events
        assert await store.async_find_command("nope") is None

    async def test_same_command_id_twice_in_one_group_writes_once(self, store: EventStore) -> None:
        a, b = await asyncio.gather(
            store.async_append("s", [ev()], command_id="c"), store.async_append("s", [ev()], command_id="c")
        )
        assert sorted([a.duplicate, b.duplicate]) == [False, True]
        assert a.events == b.events
        assert len(await store.async_read()) == 1

    async def test_failed_commit_fails_the_whole_group_and_rolls_back_caches(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.async_append("s", [ev()])
        head_before = await store.async_head()
        real_commit = store._async_commit

        async def broken(rows: Any, commands: Any) -> None:
            raise OSError("disk on fire")

        monkeypatch.setattr(store, "_async_commit", broken)
        results = await asyncio.gather(
            store.async_append("s", [ev()]), store.async_append("t", [ev()], command_id="x"),
            return_exceptions=True,
        )
        assert all(isinstance(r, OSError) for r in results)
        assert await store.async_head() == head_before
        monkeypatch.setattr(store, "_async_commit", real_commit)
        res = await store.async_append("s", [ev()], expected_version=1, command_id="x")
        assert (res.last_position, res.stream_version, res.duplicate) == (2, 2, False)
        assert res.events[0].prev_hash == head_before[1]

    @pytest.mark.parametrize(
        ("payload", "reason"),
        [
            ({"x": math.nan}, "nan_or_infinity"),
            ({"x": math.inf}, "nan_or_infinity"),
            ({"x": object()}, "not_serialisable"),
            ({"x": {1, 2}}, "not_serialisable"),
        ],
    )
    async def test_bad_payload_is_refused_before_anything_is_written(
        self, store: EventStore, payload: dict[str, Any], reason: str
    ) -> None:
        with pytest.raises(PayloadError) as info:
            await store.async_append("s", [ev("ok.event"), NewEvent("bad.event", payload)])
        assert info.value.reason == reason and info.value.event_type == "bad.event" and info.value.index == 1
        assert "bad.event" in str(info.value)
        assert await store.async_read() == [] and await store.async_head() == (0, genesis_hash(store.log_id))

    async def test_payload_over_the_limit_is_refused(self) -> None:
        store = await self.make_store(max_payload_bytes=100)
        try:
            await store.async_append("s", [ev(x="a" * 50)])
            with pytest.raises(PayloadError) as info:
                await store.async_append("s", [ev(x="a" * 200)])
            assert info.value.reason == "too_large"
            assert len(await store.async_read()) == 1
        finally:
            await store.async_close()

    @pytest.mark.parametrize("stream_id", ["", None, 5])
    async def test_stream_id_must_be_a_non_empty_string(self, store: EventStore, stream_id: Any) -> None:
        with pytest.raises(InvalidEventError):
            await store.async_append(stream_id, [ev()])

    @pytest.mark.parametrize("event_type", ["", None])
    async def test_event_type_must_be_a_non_empty_string(self, store: EventStore, event_type: Any) -> None:
        with pytest.raises(InvalidEventError):
            await store.async_append("s", [NewEvent(event_type, {})])
        assert await store.async_read() == []

    async def test_payload_with_text_that_is_not_unicode_says_so(self, store: EventStore) -> None:
        with pytest.raises(PayloadError) as info:
            await store.async_append("s", [NewEvent("bad.event", {"x": "\ud800"})])
        assert info.value.reason == "not_serialisable" and "not valid Unicode" in str(info.value)

    # ---- writer failure paths ------------------------------------------------------------------------
    async def test_conflict_with_an_uncommitted_append_fails_with_its_group(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # B conflicts only with A, which is in the same group: if the group's COMMIT fails, B must not be told
        # that the stream reached a version it never reached; it fails with the group
        await store.async_append("s", [ev()])

        async def broken(rows: Any, commands: Any) -> None:
            raise OSError("disk on fire")

        monkeypatch.setattr(store, "_async_commit", broken)
        a, b = await asyncio.gather(
            store.async_append("s", [ev()], expected_version=1),
            store.async_append("s", [ev()], expected_version=1),
            return_exceptions=True,
        )
        assert isinstance(a, OSError) and isinstance(b, OSError), (a, b)

    async def test_an_upcaster_failing_on_append_fails_only_its_own_request(self) -> None:
        up = Upcasters()

        def boom(p: dict[str, Any]) -> dict[str, Any]:
            raise KeyError("upcaster bug")

        up.register("old.event", 1, boom)
        store = await self.make_store(upcasters=up)
        try:
            good, bad, good2 = await asyncio.gather(
                store.async_append("a", [ev()]),
                store.async_append("b", [NewEvent("old.event", {}, schema_version=1)]),
                store.async_append("c", [ev()]),
                return_exceptions=True,
            )
            assert isinstance(bad, KeyError), bad
            assert not isinstance(good, BaseException) and not isinstance(good2, BaseException), (good, good2)
            events = await store.async_read()
            assert [e.stream_id for e in events] == ["a", "c"] and events[1].prev_hash == events[0].hash
        finally:
            await store.async_close()

    async def test_close_while_appends_are_queued_commits_them_even_when_closed_twice(self) -> None:
        store = await self.make_store()
        entered, gate = hold_writer_before_commit(store)
        first = asyncio.create_task(store.async_append("s", [ev(n=0)]))
        await asyncio.wait_for(entered.wait(), 5)
        store._writer.before_commit = None
        queued = [asyncio.create_task(store.async_append("s", [ev(n=i)])) for i in range(1, 5)]
        await asyncio.sleep(0)
        closes = [asyncio.create_task(store.async_close()) for _ in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *queued, *closes, return_exceptions=True), 5)
        assert not any(isinstance(r, BaseException) for r in results), results
        assert [r.last_position for r in results[:5]] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
        with pytest.raises(StoreClosedError):
            await store.async_append("s", [ev()])

    async def test_a_cancelled_writer_fails_queued_and_later_appends_instead_of_hanging(self) -> None:
        store = await self.make_store()
        entered, _ = hold_writer_before_commit(store)
        first = asyncio.create_task(store.async_append("s", [ev()]))
        await asyncio.wait_for(entered.wait(), 5)
        queued = asyncio.create_task(store.async_append("s", [ev()]))
        await asyncio.sleep(0)
        writer_task = store._writer._task
        assert writer_task is not None
        writer_task.cancel()
        for fut in (first, queued):
            with pytest.raises(StoreClosedError):
                await asyncio.wait_for(fut, 5)
        with pytest.raises(StoreClosedError):
            await asyncio.wait_for(store.async_append("s", [ev()]), 5)
        await asyncio.wait_for(store.async_close(), 5)  # no CancelledError out of close, the backend is released
        with pytest.raises(StoreClosedError):
            await store.async_read()

    async def test_writer_cancelled_during_commit_reports_the_commit_outcome(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = await self.make_store()
        try:
            real_commit = store._async_commit
            gate = asyncio.Event()
            entered = asyncio.Event()

            async def slow_commit(rows: Any, commands: Any) -> None:
                entered.set()
                await gate.wait()  # the transaction is in flight (on SQLite's thread it cannot be stopped)
                await real_commit(rows, commands)

            monkeypatch.setattr(store, "_async_commit", slow_commit)
            append = asyncio.create_task(store.async_append("s", [ev()], command_id="c-1"))
            await asyncio.wait_for(entered.wait(), 5)
            writer_task = store._writer._task
            assert writer_task is not None
            writer_task.cancel()
            await asyncio.sleep(0.01)
            gate.set()
            res = await asyncio.wait_for(append, 5)  # the group was written: its caller is told so
            assert res.last_position == 1 and not res.duplicate
            assert [e.position for e in await store.async_read()] == [1]
            with pytest.raises(StoreClosedError):
                await asyncio.wait_for(store.async_append("s", [ev()]), 5)
        finally:
            await asyncio.wait_for(store.async_close(), 5)

    async def test_commands_older_than_the_recent_cache_are_still_deduplicated(self, store: EventStore) -> None:
        store._writer.RECENT_COMMANDS = 2
        first = await store.async_append("s", [ev(n=0)], command_id="c-0")
        for i in range(1, 6):
            await store.async_append("s", [ev(n=i)], command_id=f"c-{i}")
        again = await store.async_append("s", [ev(n=99)], command_id="c-0")
        assert again.duplicate and again.events == first.events
        assert len(await store.async_read()) == 6

    # ---- argument checks and closed store ------------------------------------------------------------
    async def test_reads_and_snapshots_of_a_closed_store_raise_store_closed(self) -> None:
        store = await self.make_store()
        await store.async_append("s", [ev()])
        await store.async_save_snapshot("p", 1, {})
        await store.async_close()
        for call in (
            store.async_read(),
            store.async_read_stream("s"),
            store.async_read_since(datetime.now(UTC)),
            store.async_find_command("c"),
            store.async_hash_at(1),
            store.async_load_snapshot("p"),
            store.async_save_snapshot("p", 1, {}),
        ):
            with pytest.raises(StoreClosedError):
                await call

    async def test_bad_limits_and_batch_sizes_are_refused(self, store: EventStore) -> None:
        for i in range(3):
            await store.async_append("s", [ev(i=i)])
        for limit in (-1, 1.5, True):
            with pytest.raises(InvalidEventError):
                await store.async_read(limit=limit)  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError):
            store.async_subscribe(1, batch_size=0)
        assert len(await store.async_read(limit=0)) == 0

    # ---- chain -----------------------------------------------------------------------------------
    async def test_events_form_a_hash_chain_from_the_genesis_hash(self, store: EventStore) -> None:
        await store.async_append("s", [ev(n=1), ev(n=2)], command_id="c")
        await store.async_append("t", [ev(n=3)])
        prev = genesis_hash(store.log_id)
        for e in await store.async_read():
            assert e.prev_hash == prev
            fields = encode_fields(e.stream_id, e.event_type, e.actor, e.command_id, e.causation_id,
                                   e.correlation_id)
            payload = canonical_json(e.payload)
            assert link_hash(prev, e.position, e.stream_version, datetime_to_us(e.recorded_at),
                             e.schema_version, fields, payload) == e.hash
            prev = e.hash
        assert (await store.async_head())[1] == prev

    # ---- reads -----------------------------------------------------------------------------------
    async def test_reads_by_stream_position_range_and_time(self, store: EventStore) -> None:
        for i in range(6):
            await store.async_append(f"s-{i % 2}", [ev(i=i)])
        assert [e.payload["i"] for e in await store.async_read_stream("s-1", from_version=2)] == [3, 5]
        assert [e.position for e in await store.async_read(2, 4)] == [2, 3, 4]
        assert [e.position for e in await store.async_read(3, limit=2)] == [3, 4]
        everything = await store.async_read()
        since = everything[3].recorded_at
        got = await store.async_read_since(since)
        assert got and all(e.recorded_at >= since for e in got) and got[-1].position == 6
        assert await store.async_read_since(datetime.now(UTC) + timedelta(days=1)) == []

    async def test_read_since_finds_the_first_event_at_or_after_a_time(self) -> None:
        """Times repeat along the log (several events in one microsecond): every boundary is found, with and
        without a limit; nothing past the last time, nothing in an empty log."""
        times = iter([10, 10, 10, 20, 20, 35, 50, 50, 50, 50, 51])
        store = await self.make_store(clock=lambda: next(times))
        try:
            assert await store.async_read_since(us_to_datetime(0)) == []
            for i in range(11):
                await store.async_append(f"s-{i % 2}", [ev(i=i)])
            recorded = [e.recorded_at for e in await store.async_read()]
            for us in (0, 9, 10, 11, 20, 21, 35, 36, 50, 51, 52, 10**15):
                since = us_to_datetime(us)
                want = [i + 1 for i, t in enumerate(recorded) if t >= since]
                assert [e.position for e in await store.async_read_since(since)] == want, us
                assert [e.position for e in await store.async_read_since(since, limit=2)] == want[:2], us
            assert await store.async_read_since(recorded[-1] + timedelta(microseconds=1)) == []
        finally:
            await store.async_close()

    async def test_recorded_at_never_goes_backwards(self, store: EventStore) -> None:
        for i in range(20):
            await store.async_append("s", [ev(i=i)])
        times = [e.recorded_at for e in await store.async_read()]
        assert times == sorted(times)

    # ---- subscriptions ---------------------------------------------------------------------------
    async def test_subscription_catches_up_then_goes_live_without_gap_or_duplicate(self, store: EventStore) -> None:
        for i in range(25):
            await store.async_append("s", [ev(i=i)])
        seen: list[int] = []

        async def consume() -> None:
            async for e in store.async_subscribe(from_position=3, batch_size=4):
                seen.append(e.position)
                if e.position == 80:
                    return

        task = asyncio.create_task(consume())
        for i in range(25, 80):  # appends race with the catch-up
            await store.async_append(f"s-{i % 3}", [ev(i=i)])
            if i % 7 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(task, 10)
        assert seen == list(range(3, 81))

    async def test_slow_subscriber_is_dropped_back_to_catch_up_and_misses_nothing(self) -> None:
        store = await self.make_store(subscriber_queue_limit=5)
        try:
            await store.async_append("s", [ev()])
            it = store.async_subscribe(1)
            first = await it.__anext__()
            assert first.position == 1
            for i in range(50):  # far more than the queue limit while the subscriber is not reading
                await store.async_append("s", [ev(i=i)])
            rest = [await it.__anext__() for _ in range(50)]
            assert [e.position for e in rest] == list(range(2, 52))
            await it.aclose()  # type: ignore[attr-defined]
        finally:
            await store.async_close()

    async def test_subscription_ends_when_the_store_closes(self) -> None:
        store = await self.make_store()
        await store.async_append("s", [ev()])
        got: list[int] = []

        async def consume() -> None:
            async for e in store.async_subscribe(1):
                got.append(e.position)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await store.async_close()
        await asyncio.wait_for(task, 5)
        assert got == [1]

    # ---- upcasting, snapshots, replay ------------------------------------------------------------
    async def test_upcasters_apply_at_read_time_chained_to_current_version(self) -> None:
        up = Upcasters()
        up.register("vm.created", 1, lambda p: {"memory_mb": p.get("mem", 512)})
        up.register("vm.created", 2, lambda p: {**p, "cpus": 1})
        store = await self.make_store(upcasters=up)
        try:
            await store.async_append("vm-a", [NewEvent("vm.created", {"mem": 1024}, schema_version=1)])
            await store.async_append("vm-a", [NewEvent("vm.created", {"memory_mb": 1, "cpus": 4}, schema_version=3)])
            e1, e2 = await store.async_read_stream("vm-a")
            assert (e1.schema_version, e1.payload) == (3, {"memory_mb": 1024, "cpus": 1})
            assert (e2.schema_version, e2.payload) == (3, {"memory_mb": 1, "cpus": 4})
        finally:
            await store.async_close()

    async def test_full_replay_equals_snapshot_plus_tail(self, store: EventStore) -> None:
        proj = CountingProjection()
        for i in range(30):
            await store.async_append(f"s-{i % 4}", [ev(i=i)])
        mid = await async_replay(store, proj)
        await store.async_save_snapshot("counting", mid.position, proj.to_snapshot(mid.state))
        for i in range(30, 45):
            await store.async_append(f"s-{i % 5}", [ev(i=i)])
        full = await async_fold(store, proj)
        replayed = await async_replay(store, proj, "counting")
        assert replayed.snapshot_position == 30 and replayed.position == 45
        assert replayed.state == full and full["count"] == 45

    async def test_snapshot_records_the_head_hash_at_its_position(self, store: EventStore) -> None:
        await store.async_append("s", [ev(), ev()])
        snap = await store.async_save_snapshot("p", 1, {"k": 1})
        loaded = await store.async_load_snapshot("p")
        assert loaded is not None and loaded.position == 1 and loaded.state == {"k": 1}
        assert loaded.head_hash == snap.head_hash == (await store.async_read(1, 1))[0].hash
        assert await store.async_load_snapshot("other") is None

    async def test_snapshot_whose_head_hash_differs_is_ignored(self, store: EventStore) -> None:
        proj = CountingProjection()
        for i in range(5):
            await store.async_append("s", [ev(i=i)])
        await store.async_save_snapshot("counting", 3, {"count": 999, "streams": {}})
        # simulate a snapshot taken on a different log: same position, other head hash
        bogus = await store.async_load_snapshot("counting")
        assert bogus is not None
        real_hash_at = store.async_hash_at

        async def other_hash(position: int) -> bytes | None:
            h = await real_hash_at(position)
            return b"\x00" * 32 if position == 3 else h

        store.async_hash_at = other_hash  # type: ignore[method-assign]
        replayed = await async_replay(store, proj, "counting")
        assert replayed.snapshot_position is None and replayed.state["count"] == 5

    async def test_head_and_hash_at(self, store: EventStore) -> None:
        assert await store.async_head() == (0, genesis_hash(store.log_id))
        assert await store.async_hash_at(0) == genesis_hash(store.log_id)
        res = await store.async_append("s", [ev()], expected_version=ANY_VERSION)
        assert await store.async_head() == (1, res.events[0].hash)
        assert await store.async_hash_at(1) == res.events[0].hash
        assert await store.async_hash_at(2) is None
