"""HostConnection against libvirt's in-process test driver (test:///default): fast, no QEMU."""

from __future__ import annotations

import time
import uuid

import pytest

from moldd.domain.errors import NotFound, OperationFailed, Unavailable
from moldd.libvirt.bridge import LibvirtBridge
from moldd.libvirt.host import DomainInfo, HostConnection
from moldd.libvirt.xml import DomainSpec, build_domain_xml
from moldlab.testing.loopwatch import LoopWatch
from moldlab.testing.recorder import Recorder

URI = "test:///default"


@pytest.fixture
async def test_host(bridge: LibvirtBridge, recorder: Recorder):  # type: ignore[no-untyped-def]
    conn = recorder.connection("t", URI, bridge)
    assert await conn.async_start()
    yield conn
    for d in await conn.async_list_domains():
        if d.name.startswith("moldd-"):
            if d.state != "shutoff":
                await conn.async_destroy(d.name)
            await conn.async_undefine(d.name)
    await conn.async_stop()


def _name() -> str:
    return f"moldd-{uuid.uuid4().hex[:8]}"


async def test_start_emits_connected_on_the_loop_thread(
    test_host: HostConnection, recorder: Recorder
) -> None:
    assert test_host.connected
    assert recorder.links("t") == [("connected", "connected")]
    assert recorder.off_loop_calls == 0


async def test_lifecycle_events_arrive_on_the_loop_thread(
    test_host: HostConnection, recorder: Recorder
) -> None:
    name = _name()
    async with LoopWatch() as watch:
        info = await test_host.async_define(build_domain_xml(DomainSpec(name=name)))
        await test_host.async_create(name)
        await test_host.async_destroy(name)
        await test_host.async_undefine(name)
        await recorder.wait_domain(name, ("UNDEFINED", "REMOVED"), timeout=5)
    assert watch.max_blocked < 0.2, watch.worst
    assert recorder.pairs(name) == [
        ("DEFINED", "ADDED"),
        ("STARTED", "BOOTED"),
        ("STOPPED", "DESTROYED"),
        ("UNDEFINED", "REMOVED"),
    ]
    ev = recorder.domain_events[-1]
    assert ev.host == "t" and ev.uuid == info.uuid and ev.at.tzinfo is not None
    assert recorder.off_loop_calls == 0


async def test_list_and_state(test_host: HostConnection) -> None:
    name = _name()
    info = await test_host.async_define(build_domain_xml(DomainSpec(name=name)))
    assert info == DomainInfo(name, info.uuid, "shutoff", True)
    await test_host.async_create(name)
    listed = {d.name: d for d in await test_host.async_list_domains()}
    assert listed[name] == DomainInfo(name, info.uuid, "running", True)
    assert await test_host.async_domain_state(name) == "running"
    assert await test_host.async_domain_state("moldd-absent") is None


async def test_unknown_domain_is_not_found_and_undefine_tolerates_it(test_host: HostConnection) -> None:
    with pytest.raises(NotFound):
        await test_host.async_create("moldd-absent")
    assert await test_host.async_undefine("moldd-absent") is False


async def test_refused_operation_is_operation_failed(test_host: HostConnection) -> None:
    name = _name()
    await test_host.async_define(build_domain_xml(DomainSpec(name=name)))
    with pytest.raises(OperationFailed, match="not running"):
        await test_host.async_destroy(name)


async def test_snapshots_on_the_test_driver(test_host: HostConnection) -> None:
    name = _name()
    await test_host.async_define(build_domain_xml(DomainSpec(name=name)))
    await test_host.async_snapshot_create(name, "s1", memory=False, description="before")
    (snap,) = await test_host.async_snapshot_list(name)
    assert (snap.name, snap.description, snap.state, snap.memory, snap.current) == (
        "s1",
        "before",
        "shutoff",
        False,
        True,
    )
    await test_host.async_snapshot_revert(name, "s1")
    await test_host.async_snapshot_delete(name, "s1")
    assert await test_host.async_snapshot_list(name) == []
    with pytest.raises(NotFound):
        await test_host.async_snapshot_delete(name, "s1")


async def test_calls_without_connection_are_unavailable(bridge: LibvirtBridge, recorder: Recorder) -> None:
    conn = recorder.connection("t2", URI, bridge)
    with pytest.raises(Unavailable, match="not connected"):
        await conn.async_list_domains()


async def test_unreachable_host_keeps_retrying_with_backoff(
    bridge: LibvirtBridge, recorder: Recorder, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    uri = f"qemu+unix:///system?socket={tmp_path}/nothing-here"
    conn = recorder.connection("gone", uri, bridge, backoff_initial=0.1, backoff_max=0.4)
    t0 = time.monotonic()
    async with LoopWatch() as watch:
        assert await conn.async_start() is False
        await recorder.wait(lambda: len(recorder.links("gone")) >= 4, timeout=5, what="retries")
    assert watch.max_blocked < 0.2, watch.worst
    kinds = {k for k, _ in recorder.links("gone")}
    assert kinds == {"reconnect_failed"}
    assert "Failed to connect socket" in recorder.links("gone")[0][1]
    # 0.1 + 0.2 + 0.4 s of back-off before the 4th attempt
    assert time.monotonic() - t0 >= 0.6
    await conn.async_stop()
    n = len(recorder.links("gone"))
    await recorder.wait(lambda: True, timeout=0.1)
    assert len(recorder.links("gone")) == n
    assert not conn.connected


async def test_an_unexpected_error_while_connecting_does_not_end_reconnecting(
    bridge: LibvirtBridge, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything the open thread raises (not only libvirtError) is a failed attempt: retried, never fatal."""
    import libvirt

    real_open = libvirt.open
    failures = [RuntimeError("boom 1"), TypeError("boom 2")]

    def flaky_open(uri: str) -> libvirt.virConnect:
        if failures:
            raise failures.pop(0)
        return real_open(uri)

    monkeypatch.setattr(libvirt, "open", flaky_open)
    conn = recorder.connection("flaky", URI, bridge, backoff_initial=0.05)
    try:
        assert await conn.async_start() is False
        await conn.async_wait_connected(5)
        assert [k for k, _ in recorder.links("flaky")] == [
            "reconnect_failed",
            "reconnect_failed",
            "connected",
        ]
        assert "boom 1" in recorder.links("flaky")[0][1]
    finally:
        await conn.async_stop()
