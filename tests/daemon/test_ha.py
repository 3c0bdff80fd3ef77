"""HA on real libvirtd hosts and real QEMU guests: crashes, out-of-band stops, guest poweroff, host failure with
fencing, frozen hosts that come back (no double start), failed fencing, crash loops, watcher supervision."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest

from moldlab import GuestImage, domain_xml
from moldlab.testing.harness import Client, CommandFailed, running_daemon
from moldlab.testing.load import scaled

pytestmark = pytest.mark.libvirt


def qemu_pid(lab: Any, host: str, domain: str) -> int:
    h = next(h for h in lab.hosts if h.name == host)
    pidfile = Path(h.dir) / "run" / "qemu" / f"{domain}.pid"
    return int(pidfile.read_text().strip())


def running_copies(lab: Any, domain: str) -> list[str]:
    """On which hosts libvirt itself says the domain runs (skips hosts that don't answer)."""
    where = []
    for h in lab.hosts:
        if h.is_frozen() or not h.is_running():
            continue
        conn = libvirt.open(h.uri)
        try:
            dom = conn.lookupByName(domain)
            if dom.isActive():
                where.append(h.name)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return where


async def deploy_ha(client: Client, **extra: Any) -> dict[str, Any]:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True, **extra)
    assert job["status"] == "succeeded", job
    return await client.vm(job["vm"])


async def wait_event(client: Client, vm: str, type: str, after: int = 0, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in await client.events(vm):
            if ev["event_type"] == type and ev["position"] > after:
                return ev
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {type} for {vm} after position {after}")


async def test_ha_vm_killed_is_restarted_on_same_host(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client)
    pos = (await client.events(vm["name"]))[-1]["position"]
    os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    down = await wait_event(client, vm["name"], "libvirt.domain_event", after=pos)
    assert down["payload"]["event"] == "STOPPED" and down["payload"]["detail"] == "FAILED"
    started = await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos)
    assert started["payload"]["host"] == vm["host"]
    assert started["payload"]["cause"] == "crashed"
    after = await client.wait_vm(vm["name"], state="Running")
    assert after["host"] == vm["host"]
    assert running_copies(clean_lab, vm["internal_name"]) == [vm["host"]]
    scheduled = await wait_event(client, vm["name"], "ha.restart.scheduled", after=pos)
    assert scheduled["payload"]["trigger_position"] == down["position"]  # the decision names its cause


async def test_ha_vm_destroyed_behind_our_back_is_restarted(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client)
    pos = (await client.events(vm["name"]))[-1]["position"]
    conn = libvirt.open(next(h for h in clean_lab.hosts if h.name == vm["host"]).uri)
    try:
        conn.lookupByName(vm["internal_name"]).destroy()
    finally:
        conn.close()
    ev = await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos)
    assert ev["payload"]["cause"] == "destroyed"
    await client.wait_vm(vm["name"], state="Running")


async def test_guest_poweroff_is_restarted_with_default_policy(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client, details={"kernel_args": "halt_after=3"})
    pos = (await client.events(vm["name"]))[-1]["position"]
    ev = await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos, timeout=240)  # TCG boot, busy host
    assert ev["payload"]["cause"] == "guest-shutdown"


async def test_guest_poweroff_is_respected_with_on_failure_policy(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client, hapolicy="on-failure", details={"kernel_args": "halt_after=3"})
    pos = (await client.events(vm["name"]))[-1]["position"]
    ev = await wait_event(client, vm["name"], "ha.not_restarted", after=pos, timeout=240)  # TCG boot, busy host
    assert ev["payload"]["cause"] == "guest-shutdown"
    await asyncio.sleep(1.0)  # negative check: an observation window in which nothing may restart it
    assert (await client.vm(vm["name"]))["state"] == "Stopped"
    assert running_copies(clean_lab, vm["internal_name"]) == []


async def test_stop_through_moldd_is_never_undone(daemon: Any, client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client)
    pos = (await client.events(vm["name"]))[-1]["position"]
    await client.job("stopVirtualMachine", id=vm["name"], forced=True)
    await wait_event(client, vm["name"], "libvirt.domain_event", after=pos)  # libvirt's STOPPED is folded
    await _until_ha_done_with(daemon, vm["name"])  # and whatever HA queued for it handled
    assert (await client.vm(vm["name"]))["state"] == "Stopped"
    assert not [e for e in await client.events(vm["name"]) if e["event_type"].startswith("ha.")]
    assert running_copies(clean_lab, vm["internal_name"]) == []


async def test_ha_disabled_vm_stays_down(daemon: Any, client: Client, clean_lab: Any) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=False)
    vm = await client.vm(job["vm"])
    os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    stopped = await client.wait_vm(vm["name"], state="Stopped")
    assert stopped["stop_cause"] == "crashed"
    await _until_ha_done_with(daemon, vm["name"])
    assert (await client.vm(vm["name"]))["state"] == "Stopped"
    assert not [e for e in await client.events(vm["name"]) if e["event_type"].startswith("ha.")]


async def test_crash_loop_backs_off_then_gives_up(make_config: Any, clean_lab: Any) -> None:
    config = make_config(ha={"max_restarts": 3, "backoff_base_s": 0.3, "backoff_cap_s": 2.0, "window_s": 120})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, details={"kernel_args": "halt_after=1"})
        await client.wait_vm(vm["name"], timeout=90, state="Error")
        events = await client.events(vm["name"])
        delays = [e["payload"]["delay_s"] for e in events if e["event_type"] == "ha.restart.scheduled"]
        assert delays == sorted(delays) and delays[0] == 0 and delays[-1] > delays[1] > 0
        gave_up = [e for e in events if e["event_type"] == "ha.gave_up"]
        assert len(gave_up) == 1 and "restarts" in gave_up[0]["payload"]["reason"]
        # Error is final for HA: nothing more happens
        n = len(events)
        await asyncio.sleep(2.5)  # negative check: an observation window in which nothing more may happen
        assert len(await client.events(vm["name"])) == n


async def test_host_killed_vms_restart_elsewhere_after_fencing(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client, host="host0")
    other = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=False, host="host0")
    t0 = time.monotonic()
    clean_lab.hosts[0].kill()
    moved = await client.wait_vm(vm["name"], timeout=40, state="Running", host="host1")
    elapsed = time.monotonic() - t0
    hosts = (await client.call("listHosts"))["result"]["host"]
    assert next(h for h in hosts if h["name"] == "host0")["health"] == "Fenced"
    health = [e["payload"]["to"] for e in await client.events_of_stream("host-host0") if e["event_type"] == "host.health"]
    assert health[:4] == ["Suspect", "Down", "Fencing", "Fenced"]
    assert running_copies(clean_lab, vm["internal_name"]) == ["host1"]
    not_ha = await client.vm(other["vm"])
    assert not_ha["state"] == "Stopped" and not_ha["stop_cause"] == "host-failed"
    assert moved["host"] == "host1"
    print(f"host failure to running elsewhere: {elapsed:.1f} s (bench/ha.py measures this)")


async def test_frozen_host_is_fenced_and_no_double_start_after_it_returns(client: Client, clean_lab: Any) -> None:
    vm = await deploy_ha(client, host="host0")
    clean_lab.hosts[0].freeze()
    await client.wait_vm(vm["name"], timeout=40, state="Running", host="host1")
    clean_lab.hosts[0].thaw()
    await client.wait_host(  # it comes back
        "host0", timeout=30, health="Up", link="connected"
    )
    # the shut-off definition HA left behind on host0 is undefined by the resync, as a recorded fact
    removed = await wait_event(client, vm["name"], "vm.stale_definition_removed", timeout=30)
    assert removed["payload"]["host"] == "host0" and removed["payload"]["current_host"] == "host1"
    conn = libvirt.open(clean_lab.hosts[0].uri)
    try:
        assert vm["internal_name"] not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()
    assert running_copies(clean_lab, vm["internal_name"]) == ["host1"]
    assert (await client.vm(vm["name"]))["host"] == "host1"


async def test_a_stale_copy_found_by_the_resync_is_destroyed_and_its_definition_removed(
    config: Any, clean_lab: Any, guest_image: GuestImage
) -> None:
    """A copy of a Running VM on a host that is not its own (a frozen host whose fence had not killed it yet when
    it answered again) is destroyed by the resync, and its definition is undefined as well, so no later resync
    or start can mistake it for the VM. Made deterministic: the copy is started while moldd is down."""
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host1")
    conn = libvirt.open(clean_lab.hosts[0].uri)
    try:
        conn.defineXML(domain_xml(vm["internal_name"], guest_image)).create()
    finally:
        conn.close()
    assert sorted(running_copies(clean_lab, vm["internal_name"])) == ["host0", "host1"]
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        destroyed = await wait_event(client, vm["name"], "vm.stale_copy_destroyed", timeout=scaled(30))
        removed = await wait_event(client, vm["name"], "vm.stale_definition_removed", timeout=scaled(30))
        assert destroyed["payload"]["host"] == removed["payload"]["host"] == "host0"
        assert removed["payload"]["current_host"] == "host1" and removed["position"] > destroyed["position"]
        conn = libvirt.open(clean_lab.hosts[0].uri)
        try:
            assert vm["internal_name"] not in [dom.name() for dom in conn.listAllDomains()]
        finally:
            conn.close()
        assert running_copies(clean_lab, vm["internal_name"]) == ["host1"]
        after = await client.vm(vm["name"])
        assert after["host"] == "host1" and after["state"] == "Running"


async def test_failed_fencing_starts_nothing_elsewhere(make_config: Any, clean_lab: Any) -> None:
    config = make_config(ha={"fence_command": ["false"], "fence_timeout_s": 2.0})
    # per-host fence commands of the lab would win over [ha].fence_command: drop them for this test
    text = config.path.read_text().replace("fence_command = [\"python3\"", "# fence_command = [\"python3\"")
    config.path.write_text(text)
    from moldd.config import load_config

    config = load_config(config.path)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host0")
        clean_lab.hosts[0].freeze()
        await client.wait_host("host0", timeout=40, health="FenceFailed")
        assert (await client.vm(vm["name"]))["power_state"] == "unknown"
        await asyncio.sleep(1.0)  # negative check: an observation window in which nothing may start elsewhere
        assert running_copies(clean_lab, vm["internal_name"]) == []  # host0 frozen: not listed; nothing on host1
        assert (await client.vm(vm["name"]))["host"] == "host0"
        clean_lab.hosts[0].thaw()
        await client.wait_host("host0", timeout=30, health="Up", link="connected")
        back = await client.wait_vm(vm["name"], state="Running", power_state="on")  # the resync's finding
        assert back["host"] == "host0"
        assert running_copies(clean_lab, vm["internal_name"]) == ["host0"]


async def test_vm_that_died_while_daemon_was_down_is_restarted(config: Any, clean_lab: Any) -> None:
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client)
    os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    await _until(lambda: running_copies(clean_lab, vm["internal_name"]) == [], "libvirt saw it die")
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        after = await client.wait_vm(vm["name"], timeout=20, state="Running")
        kinds = [e["event_type"] for e in await client.events(vm["name"])]
        assert "vm.reconciled" in kinds and "ha.restart.succeeded" in kinds
        assert after["host"] == vm["host"]


async def _ha_status(daemon: Any) -> tuple[int, dict[str, Any]]:
    """GET /v1/health on the daemon's socket: what a probe (and systemd's watchdog) sees."""
    connector = aiohttp.UnixConnector(path=str(daemon.config.socket))
    async with aiohttp.ClientSession(connector=connector) as http, http.get("http://moldd/v1/health") as resp:
        return resp.status, await resp.json()


async def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a condition of the daemon's own state (checked after each turn of the loop's work)."""
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still not {what} after {scaled(timeout):g} s")
        await asyncio.sleep(0.02)


async def _until_ha_done_with(daemon: Any, vm: str, timeout: float = 30.0) -> None:
    """HA has handled everything queued for ``vm``: no job of it runs and nothing waits in the queue."""
    ha = daemon.ha
    await _until(lambda: vm not in ha.active and ha.queue.empty(), f"HA done with {vm}", timeout)


async def test_crashed_watcher_is_restarted_and_recorded(daemon: Any, client: Client) -> None:
    ha = daemon.ha
    keeper = ha.supervised["vm-watcher"]
    ha.queue.put_nowait(("only-a-name",))  # the real watcher loop crashes unpacking it
    await _until(lambda: ha.crashed_in_a_row["vm-watcher"] == 1, "crashed")
    events = (await client.call("listEvents", stream="daemon"))["result"]["event"]
    restarted = [e for e in events if e["event_type"] == "ha.watcher_restarted"]
    assert restarted and restarted[-1]["payload"]["watcher"] == "vm-watcher"
    assert "ValueError" in restarted[-1]["payload"]["error"]
    assert ha.supervised["vm-watcher"] is keeper and not keeper.done()  # the same supervisor restarted it
    assert ha.healthy()  # one crash is not a crash loop
    ha.queue.put_nowait(("no-such-vm", "crashed", 0))  # a real piece of work for the restarted watcher
    await _until(lambda: ha.crashed_in_a_row["vm-watcher"] == 0, "working again")
    status, report = await _ha_status(daemon)
    assert status == 200 and report["checks"]["ha"] is True


async def test_crash_looping_vm_watcher_turns_health_bad_until_it_works_again(daemon: Any) -> None:
    ha = daemon.ha
    for _ in range(ha.CRASH_LOOP):
        ha.queue.put_nowait(("only-a-name",))  # each one crashes the real watcher loop once more
    await _until(lambda: not ha.healthy(), "unhealthy")
    status, report = await _ha_status(daemon)
    assert status == 503 and report["checks"]["ha"] is False
    assert all(not t.done() for t in ha.supervised.values())  # alive, restarted each time, yet crash-looping
    ha.queue.put_nowait(("no-such-vm", "crashed", 0))
    await _until(ha.healthy, "healthy again")
    status, report = await _ha_status(daemon)
    assert status == 200 and report["ok"]


async def test_crash_looping_host_watcher_turns_health_bad_until_it_stops_crashing(
    make_config: Any, clean_lab: Any
) -> None:
    """A fault in the host watcher's handling of a host's link: each real disconnect / reconnect of a real
    libvirtd crashes it; health fails once it crash-loops and recovers once it handles a link event again."""
    config = make_config(ha={"host_down_after_s": 120.0})  # the fault-free handling at the end must not fence
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        ha, host = d.ha, clean_lab.hosts[0]
        handle = ha._async_host_item
        fault = {"on": True, "crashes": 0}

        async def faulty(name: str, kind: str, position: int) -> None:
            if fault["on"]:
                fault["crashes"] += 1
                raise RuntimeError(f"injected fault handling {kind} of {name}")
            await handle(name, kind, position)

        ha._async_host_item = faulty

        async def bounce_libvirtd() -> None:  # a libvirtd crash and restart: link disconnected, then connected
            before = fault["crashes"]
            await asyncio.to_thread(host.kill_daemon)
            await asyncio.to_thread(host.restart)
            await client.wait_host(host.name, timeout=60, link="connected")
            await _until(lambda: fault["crashes"] >= before + 2 or not fault["on"], "handled both link events")

        for _ in range(ha.CRASH_LOOP):
            if not ha.healthy():
                break
            await bounce_libvirtd()
        assert fault["crashes"] >= ha.CRASH_LOOP and not ha.healthy()
        status, report = await _ha_status(d)
        assert status == 503 and report["checks"]["ha"] is False
        events = await client.events_of_stream("daemon")
        crashes = [e for e in events if e["event_type"] == "ha.watcher_restarted" and "injected fault" in e["payload"]["error"]]
        assert len(crashes) == fault["crashes"] and {e["payload"]["watcher"] for e in crashes} == {"host-watcher"}

        fault["on"] = False  # it stops crashing: the next link event is handled and health recovers
        position = (await client.events_of_stream(f"host-{host.name}"))[-1]["position"]
        await asyncio.to_thread(host.kill_daemon)
        await asyncio.to_thread(host.restart)
        await _until(ha.healthy, "healthy again")
        status, report = await _ha_status(d)
        assert status == 200 and report["checks"]["ha"] is True
        await client.wait_host(host.name, timeout=60, link="connected", health="Up")
        handled = [e for e in await client.events_of_stream(f"host-{host.name}") if e["position"] > position]
        assert [e["payload"]["to"] for e in handled if e["event_type"] == "host.health"][:1] == ["Suspect"]


async def test_health_turns_bad_when_ha_watcher_is_dead(daemon: Any) -> None:
    assert daemon.app.health()["ok"]
    for task in daemon.ha.supervised.values():
        task.cancel()  # dead, not crashed: a keeper ends only when cancelled
    await asyncio.gather(*daemon.ha.supervised.values(), return_exceptions=True)
    report = daemon.app.health()
    assert report["ok"] is False and report["checks"]["ha"] is False


def _config_with_failing_fence(make_config: Any) -> Any:
    from moldd.config import load_config

    config = make_config(ha={"fence_command": ["false"], "fence_timeout_s": 2.0})
    text = config.path.read_text().replace('fence_command = ["python3"', '# fence_command = ["python3"')
    config.path.write_text(text)
    return load_config(config.path)


async def test_operator_confirmation_moves_vms_of_an_unfenceable_host(make_config: Any, clean_lab: Any) -> None:
    config = _config_with_failing_fence(make_config)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        with pytest.raises(CommandFailed) as refused:
            await client.call("confirmHostFenced", host="host0")
        assert refused.value.code == "invalid_state" and "Up" in str(refused.value)
        vm = await deploy_ha(client, host="host0")
        clean_lab.hosts[0].freeze()
        await client.wait_host("host0", timeout=40, health="FenceFailed")
        alerts = d.app.health()["alerts"]
        assert any("host0 is FenceFailed" in a for a in alerts), alerts
        clean_lab.hosts[0].kill()  # the operator pulls the plug, then says so
        await client.call("confirmHostFenced", host="host0", reason="PDU outlet 7 switched off by hand")
        moved = await client.wait_vm(vm["name"], timeout=30, state="Running", host="host1")
        assert moved["host"] == "host1"
        confirmed = [e for e in await client.events_of_stream("host-host0") if e["payload"].get("confirmed_by_operator")]
        assert confirmed and f"uid={os.getuid()}" in confirmed[0]["actor"]


async def test_fencing_that_lied_never_leaves_two_copies(make_config: Any, clean_lab: Any) -> None:
    """A fence command that says "done" without killing anything. Before starting the VM elsewhere HA probes its
    disk: still locked by the live copy, so the fence lied. That is recorded on the VM, the host goes FenceFailed
    (an alert), no second QEMU is spawned at all and the VM's restart budget is untouched (it used to end in
    Error); when the host returns its surviving copy is found running: one copy, where it really runs."""
    config = make_config(ha={"fence_command": ["true"], "max_restarts": 1, "backoff_base_s": 0.2})
    text = config.path.read_text().replace('fence_command = ["python3"', '# fence_command = ["python3"')
    config.path.write_text(text)
    from moldd.config import load_config

    config = load_config(config.path)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host0")
        clean_lab.hosts[0].freeze()
        lied = await wait_event(client, vm["name"], "ha.fence_lied", timeout=40)
        assert lied["payload"]["host"] == "host0" and "lock" in lied["payload"]["probe"]
        await client.wait_host("host0", health="FenceFailed")
        assert any("host0 is FenceFailed" in a for a in d.app.health()["alerts"])
        kinds = [e["event_type"] for e in await client.events(vm["name"])]
        assert "ha.restart.started" not in kinds and "ha.restart.failed" not in kinds, kinds
        assert (await client.vm(vm["name"]))["state"] == "Stopped"
        assert running_copies(clean_lab, vm["internal_name"]) == []  # host0 is frozen, host1 has none
        clean_lab.hosts[0].thaw()
        back = await client.wait_vm(vm["name"], timeout=30, state="Running", host="host0")
        assert back["ha_status"] is None
        assert running_copies(clean_lab, vm["internal_name"]) == ["host0"]
        kinds = [e["event_type"] for e in await client.events(vm["name"])]
        assert "ha.restart.started" not in kinds and "ha.gave_up" not in kinds, kinds


async def test_evacuation_follows_ha_priority(make_config: Any, clean_lab: Any) -> None:
    config = make_config(max_vms=3)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        low = await deploy_ha(client, host="host0", hapriority=1)
        high = await deploy_ha(client, host="host0", hapriority=90)
        clean_lab.hosts[0].kill()
        await client.wait_vm(low["name"], timeout=40, state="Running", host="host1")
        await client.wait_vm(high["name"], timeout=40, state="Running", host="host1")
        evac = [e for e in await client.events_of_stream("host-host0") if e["event_type"] == "ha.evacuation"]
        assert evac[-1]["payload"]["vms"] == [high["name"], low["name"]]
        started = {}
        for name in (low["name"], high["name"]):
            ev = [e for e in await client.events(name) if e["event_type"] == "ha.restart.started"][-1]
            started[name] = ev["position"]
        assert started[high["name"]] < started[low["name"]]


async def test_host_that_died_while_daemon_was_down_is_fenced_and_evacuated(config: Any, clean_lab: Any) -> None:
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host0")
    clean_lab.hosts[0].kill()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        moved = await client.wait_vm(vm["name"], timeout=40, state="Running", host="host1")
        assert moved["host"] == "host1"
        health = [e["payload"]["to"] for e in await client.events_of_stream("host-host0") if e["event_type"] == "host.health"]
        assert "Fenced" in health
        assert running_copies(clean_lab, vm["internal_name"]) == ["host1"]


async def _crash_twice(client: Client, lab: Any, vm: dict[str, Any]) -> dict[str, Any]:
    """Crash an HA VM, let HA restart it, crash it again: returns the ha.restart.scheduled of the second restart,
    which waits out a back-off (the first restart does not)."""
    pos = (await client.events(vm["name"]))[-1]["position"]
    os.kill(qemu_pid(lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    await wait_event(client, vm["name"], "ha.restart.succeeded", after=pos)
    await client.wait_vm(vm["name"], state="Running")
    pos = (await client.events(vm["name"]))[-1]["position"]
    os.kill(qemu_pid(lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
    return await wait_event(client, vm["name"], "ha.restart.scheduled", after=pos)


async def test_user_acting_during_ha_backoff_wins(make_config: Any, clean_lab: Any) -> None:
    """The manual: to really stop an HA VM, stop it through Mold. A stop sent while HA waits out its back-off keeps
    the VM down (it used to be refused: "only a Running VM can be stopped", and HA restarted it anyway); a start
    sent meanwhile is followed by an ha.cancelled, not by a VM left "pending" for ever."""
    config = make_config(ha={"backoff_base_s": 4.0, "backoff_cap_s": 8.0})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        kept, started = await deploy_ha(client, host="host0"), await deploy_ha(client, host="host1")
        sched_kept, sched_started = await asyncio.gather(
            _crash_twice(client, clean_lab, kept), _crash_twice(client, clean_lab, started)
        )
        assert sched_kept["payload"]["delay_s"] > 0 and sched_started["payload"]["delay_s"] > 0
        stop = await client.job("stopVirtualMachine", id=kept["name"])
        assert stop["status"] == "succeeded", stop
        start = await client.job("startVirtualMachine", id=started["name"])
        assert start["status"] == "succeeded", start
        # the back-off ends, HA looks again, finds it stopped by the user and lets go
        await _until_ha_done_with(d, kept["name"], timeout=sched_kept["payload"]["delay_s"] + 30)
        after = await client.vm(kept["name"])
        assert (after["state"], after["stop_cause"], after["ha_status"]) == ("Stopped", "user", None)
        late = [e for e in await client.events(kept["name"]) if e["position"] > sched_kept["position"]]
        assert not [e for e in late if e["event_type"] == "ha.restart.started"], late
        assert running_copies(clean_lab, kept["internal_name"]) == []
        cancelled = await wait_event(client, started["name"], "ha.cancelled", after=sched_started["position"])
        # the back-off may end while the user's start is still under way (a busy machine) or after it
        assert any(s in cancelled["payload"]["reason"] for s in ("Running", "Starting")), cancelled
        assert (await client.vm(started["name"]))["ha_status"] is None
        assert running_copies(clean_lab, started["internal_name"]) == [started["host"]]


async def test_host_fenced_before_a_daemon_restart_is_up_once_it_answers(config: Any, clean_lab: Any) -> None:
    """The host came back while moldd was down: its "connected" is folded before HA listens, and HA's catch-up
    used to leave it Fenced (so never placed on again) for ever."""
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host0")
        clean_lab.hosts[0].kill()
        await client.wait_vm(vm["name"], timeout=40, state="Running", host="host1")
        await client.wait_host("host0", timeout=10, health="Fenced")
    clean_lab.hosts[0].restart()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await client.wait_host("host0", timeout=15, health="Up", link="connected")
        assert running_copies(clean_lab, vm["internal_name"]) == ["host1"]
        assert (await client.vm(vm["name"]))["host"] == "host1"


async def test_no_room_waits_without_burning_the_budget_and_restarts_when_a_host_returns(
    make_config: Any, clean_lab: Any
) -> None:
    config = make_config(max_vms=1, daemon={"tolerated_host_failures": 0}, ha={"max_restarts": 2})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        vm = await deploy_ha(client, host="host0")
        await client.job("deployVirtualMachine", template="tiny", offering="small", host="host1")  # fills host1
        clean_lab.hosts[0].kill()
        waiting = await wait_event(client, vm["name"], "ha.waiting", timeout=40)
        assert "capacity" in waiting["payload"]["reason"]
        await _until_ha_done_with(d, vm["name"])  # the job ended waiting: nothing counted
        assert (await client.vm(vm["name"]))["state"] == "Stopped"  # not Error: the budget is untouched
        clean_lab.hosts[0].restart()
        back = await client.wait_vm(vm["name"], timeout=40, state="Running", host="host0")
        assert back["ha_status"] is None
        assert running_copies(clean_lab, vm["internal_name"]) == ["host0"]
