"""The bridge runs calls in worker threads, maps libvirt errors, bounds calls and isolates pools."""

from __future__ import annotations

import asyncio
import threading
import time

import libvirt
import pytest

from moldd.domain.errors import NotFound, OperationFailed, Unavailable
from moldd.libvirt.bridge import LibvirtBridge, translate_error
from moldlab.testing.load import scaled
from moldlab.testing.loopwatch import LoopWatch


def _err(code: int, domain: int, msg: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(msg)
    exc.err = (code, domain, msg, 2, None, None, None, 0, 0)
    return exc


def test_no_domain_is_not_found_keeping_the_message() -> None:
    err = translate_error(_err(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "Domain not found: vm1"))
    assert isinstance(err, NotFound) and "Domain not found: vm1" in err.message


def test_broken_connection_is_unavailable() -> None:
    for code, dom in [
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC),  # Cannot write data: Broken pipe
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC),  # client socket is closed / keepalive
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE),
    ]:
        assert isinstance(translate_error(_err(code, dom, "x")), Unavailable), (code, dom)


def test_other_errors_are_operation_failed() -> None:
    err = translate_error(
        _err(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "domain is not running"),
        what="destroy vm1",
    )
    assert isinstance(err, OperationFailed)
    assert err.message == "destroy vm1: domain is not running"


async def test_calls_run_in_a_worker_thread(bridge: LibvirtBridge) -> None:
    loop_thread = threading.current_thread()
    ran_in = await bridge.async_call(threading.current_thread)
    assert ran_in is not loop_thread and ran_in.name.startswith("libvirt-default-short")
    ran_long = await bridge.async_call(threading.current_thread, long=True, pool="h1")
    assert ran_long.name.startswith("libvirt-h1-long")


async def test_libvirt_error_from_worker_is_translated(bridge: LibvirtBridge) -> None:
    def fail() -> None:
        raise _err(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "Domain not found")

    with pytest.raises(NotFound):
        await bridge.async_call(fail)


async def test_stuck_call_times_out_as_unavailable_without_blocking_the_loop(bridge: LibvirtBridge) -> None:
    release = threading.Event()
    async with LoopWatch() as watch:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"did not answer within 0\.2 s"):
            await bridge.async_call(release.wait, 5, timeout=0.2, pool="stuck")
        assert time.monotonic() - t0 < scaled(1.0)
    release.set()
    assert watch.max_blocked < 0.2, watch.worst


async def test_a_stuck_pool_does_not_starve_other_hosts(bridge: LibvirtBridge) -> None:
    release, entered = threading.Event(), threading.Event()

    def hang() -> None:
        entered.set()
        release.wait(10)

    stuck = [asyncio.ensure_future(bridge.async_call(hang, pool="frozen", timeout=None)) for _ in range(20)]
    assert await asyncio.to_thread(entered.wait, 10)  # the frozen pool's workers are stuck
    t0 = time.monotonic()
    assert await bridge.async_call(lambda: 42, pool="healthy") == 42
    assert time.monotonic() - t0 < scaled(0.5)  # a bound for a hang, stretched with the load
    # ... and long operations have their own pool: a short call of the same host still runs.
    busy = [asyncio.ensure_future(bridge.async_call(release.wait, 10, pool="h", long=True)) for _ in range(4)]
    assert await bridge.async_call(lambda: 7, pool="h", timeout=1) == 7
    release.set()
    await asyncio.gather(*stuck, *busy)


async def test_shutdown_refuses_new_calls() -> None:
    b = LibvirtBridge()
    b.shutdown()
    with pytest.raises(Unavailable):
        await b.async_call(lambda: 1)


async def test_a_call_that_timed_out_while_queued_never_runs_later(bridge: LibvirtBridge) -> None:
    """A caller told "did not answer" must not have its operation (say, destroy) run minutes later,
    when a frozen host's stuck worker frees up: a queued call is dropped at its timeout."""
    b = LibvirtBridge(short_workers=1)
    release, entered = threading.Event(), threading.Event()
    ran: list[str] = []

    def hang() -> None:
        entered.set()
        release.wait(10)

    blocker = asyncio.ensure_future(b.async_call(hang, pool="h", timeout=None))
    assert await asyncio.to_thread(entered.wait, 10)  # the one worker is taken
    with pytest.raises(Unavailable, match=r"did not start within 0\.2 s"):
        await b.async_call(ran.append, "destroy", pool="h", timeout=0.2)
    release.set()
    await blocker
    assert await b.async_call(lambda: "next", pool="h") == "next"
    assert ran == []
    b.shutdown()


async def test_a_closed_gate_refuses_every_call_but_closing_a_connection() -> None:
    """Cluster mode: a standby or deposed leader (gate false) makes no libvirt call; it may still close its own."""
    bridge = LibvirtBridge()
    leading = True
    bridge.gate = lambda: leading
    calls: list[str] = []

    def start_domain() -> str:
        calls.append("start")
        return "started"

    def _close_conn() -> None:
        calls.append("close")

    try:
        assert await bridge.async_call(start_domain) == "started"
        leading = False
        with pytest.raises(Unavailable) as info:
            await bridge.async_call(start_domain)
        assert info.value.code == "not_leader"
        with pytest.raises(Unavailable):
            await bridge.submit(start_domain)
        await bridge.async_call(_close_conn)
        assert calls == ["start", "close"]
    finally:
        bridge.shutdown()
