"""The daemon as operators meet it: moldctl against a real daemon, SO_PEERCRED actors in the log, out-of-band
changes showing up within a second, restart recovery, and a loop that is never blocked by libvirt."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from moldlab.testing.harness import Client, running_daemon
from moldlab.testing.harness import async_moldctl as moldctl
from moldlab.testing.load import scaled
from moldlab.testing.loopwatch import LoopWatch
from tests.daemon.test_ha import qemu_pid

pytestmark = pytest.mark.libvirt


async def test_moldctl_deploys_follows_the_job_and_lists(daemon: Any, client: Client) -> None:
    sock = daemon.config.socket
    code, out, err = await moldctl(
        sock, "vm", "deploy", "--template", "tiny", "--offering", "small", "--name-display", "cli vm"
    )
    assert code == 0, err
    assert "succeeded" in out.lower()
    code, out, err = await moldctl(sock, "--json", "vm", "list")
    assert code == 0, err
    vms = json.loads(out)["virtualmachine"]
    assert [v["display_name"] for v in vms] == ["cli vm"] and vms[0]["state"] == "Running"
    code, out, err = await moldctl(sock, "vm", "reboot", "nope")
    assert code == 1 and "no VM" in err
    code, out, err = await moldctl(sock, "vm", "list")
    assert code == 0 and "Running" in out and "cli vm" in out


async def test_actor_is_the_callers_uid_and_pid(client: Client) -> None:
    reply = await client.call("deployVirtualMachine", template="tiny", offering="small", startvm=False)
    events = await client.events(reply["result"]["vm"]["name"])
    first = events[0]
    assert first["event_type"] == "vm.deploy.requested"
    assert f"uid={os.getuid()}" in first["actor"] and f"pid={os.getpid()}" in first["actor"]
    assert first["command_id"] == reply["result"]["job"]["id"]


async def test_out_of_band_destroy_shows_up_in_the_state(client: Client, clean_lab: Any) -> None:
    """(How fast is measured by bench/ha.py; here: that it is the libvirt event, not a poll, that does it.)"""
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    vm = await client.vm(job["vm"])
    conn = libvirt.open(next(h for h in clean_lab.hosts if h.name == vm["host"]).uri)
    try:
        conn.lookupByName(vm["internal_name"]).destroy()
    finally:
        conn.close()
    stopped = await client.wait_vm(vm["name"], timeout=5.0, state="Stopped")
    cause = [e for e in await client.events(vm["name"]) if e["event_type"] == "libvirt.domain_event"][-1]
    assert cause["payload"]["detail"] == "DESTROYED" and cause["actor"] == "libvirt"
    assert stopped["stop_cause"] == "destroyed" and stopped["power_state"] == "off"


async def test_daemon_killed_mid_command_leaves_nothing_stuck(config: Any, clean_lab: Any) -> None:
    """A daemon that dies while a VM is Starting: on restart the VM is reconciled with libvirt, job closed."""
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        name = job["vm"]
        d.app.hosts.conns["host0"]  # the daemon is up
        # Simulate a crash between "start requested" and the outcome: record the request, never run the job.
        vm = d.app.model.vms[name]
        await d.app.async_record(vm, "vm.start.requested", {"host": vm.host}, job="lost-job", first=False)
        assert d.app.model.vms[name].state == "Starting"
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        after = await client.vm(name)
        assert after["state"] == "Stopped"
        rec = [e for e in await client.events(name) if e["event_type"] == "vm.reconciled"]
        assert rec and rec[-1]["payload"]["was"] == "Starting"


async def test_restart_restores_the_projection_from_snapshot_and_tail(make_config: Any) -> None:
    config = make_config(daemon={"snapshot_every": 5})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        for _ in range(3):
            await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        before = (await client.call("listVirtualMachines"))["result"]
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        snap = await d.store.async_load_snapshot("moldd.readmodel")
        assert snap is not None and snap.position > 0
        after = (await client.call("listVirtualMachines"))["result"]
        assert after == before


async def test_libvirt_work_never_blocks_the_loop(client: Client, clean_lab: Any) -> None:
    async with LoopWatch() as watch:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", host="host0")
        await client.job("stopVirtualMachine", id=job["vm"], forced=True)
        await asyncio.to_thread(
            clean_lab.hosts[1].freeze
        )  # (the lab is sync) calls to a frozen host must not hold the loop either
        await client.call("listHosts")
        await asyncio.sleep(1.0)  # an observation window: the loop must not block while host1 stays frozen
        await client.job("startVirtualMachine", id=job["vm"], host="host0")
        await asyncio.to_thread(clean_lab.hosts[1].thaw)
    assert watch.ticks > 50
    assert watch.max_blocked < 1.0, f"event loop blocked for {watch.max_blocked:.3f} s (lag {watch.max_lag:.3f} s)"


async def test_daemon_process_logs_json_lines_and_stops_cleanly_on_sigterm(make_config: Any) -> None:
    config = make_config(daemon={"log_level": "info"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moldd.daemon", "--config", str(config.path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not config.socket.exists():
            assert time.monotonic() < deadline, "daemon did not create its socket"
            await asyncio.sleep(0.1)
        async with Client(config.socket) as client:
            reply = await client.call("createInstanceGroup", name="web")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert not config.socket.exists()
        assert proc.stderr is not None
        lines = [
            json.loads(line) for line in (await proc.stderr.read()).decode().splitlines() if line.strip()
        ]
        entry = next(
            x for x in lines if x.get("event") == "log_event" and x.get("event_type") == "group.created"
        )
        assert entry["position"] == reply["position"] and f"uid={os.getuid()}" in entry["actor"]
        assert {"timestamp", "level"} <= set(entry)
        # the shutdown says why and that it ended (issue 12, item 13)
        stopping = [x for x in lines if x.get("event") == "daemon_stopping"]
        assert stopping and stopping[0]["signal"] == "SIGTERM", lines[-5:]
        assert lines[-1].get("event") == "daemon_stopped"
    finally:
        if proc.returncode is None:
            proc.kill()


def test_bad_config_is_refused_with_file_key_and_reason(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nsocket_mode = "rw"\n[[hosts]]\nname = "h1"\nuri = "test:///default"\n')
    res = subprocess.run(
        [sys.executable, "-m", "moldd.daemon", "--config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert str(bad) in res.stderr and "daemon.socket_mode" in res.stderr and "octal" in res.stderr
    assert "Traceback" not in res.stderr


_ = qemu_pid


async def test_reconnect_resyncs_what_happened_while_disconnected(make_config: Any, clean_lab: Any) -> None:
    """libvirtd restarts (guests keep running); meanwhile a guest dies, and its event is lost with the
    connection. After the reconnect moldd resyncs and records what it found."""
    config = make_config(ha={"host_down_after_s": 30.0})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", host="host0")
        vm = await client.vm(job["vm"])
        host = clean_lab.hosts[0]
        pid = qemu_pid(clean_lab, "host0", vm["internal_name"])
        host.kill_daemon()
        await client.wait_host("host0", timeout=10, link="disconnected")
        os.kill(pid, signal.SIGKILL)  # nobody is there to see it
        await _async_gone(pid)
        host.restart()
        found = await client.wait_vm(vm["name"], timeout=30, state="Stopped")
        assert found["stop_cause"] == "found-stopped"
        rec = [e for e in await client.events(vm["name"]) if e["event_type"] == "vm.reconciled"][-1]
        assert rec["payload"]["was"] == "Running" and rec["actor"] == "system"
        hosts = (await client.call("listHosts"))["result"]["host"]
        assert next(h for h in hosts if h["name"] == "host0")["health"] in ("Up", "Suspect")


async def test_systemd_gets_ready_after_the_socket_listens_and_watchdog_pings(
    make_config: Any, tmp_path: Path
) -> None:
    import socket as socketlib

    config = make_config()
    notify_path = tmp_path / "notify.sock"
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moldd.daemon", "--config", str(config.path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    socket_at_ready = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
            data = await asyncio.wait_for(loop.sock_recv(listener, 4096), 30)
            text = data.decode()
            if "READY=1" in text:
                socket_at_ready = config.socket.exists()
            messages.append(text)
        assert any("READY=1" in m for m in messages), messages
        assert socket_at_ready is True  # READY only once clients can connect
        assert sum("WATCHDOG=1" in m for m in messages) >= 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        listener.close()
        if proc.returncode is None:
            proc.kill()


async def test_fold_equals_snapshot_round_trip_plus_tail_at_every_position(
    daemon: Any, client: Client, clean_lab: Any
) -> None:
    """Projection determinism on a log the daemon wrote: folding every event gives what the daemon shows, and so
    does restoring a JSON snapshot taken at ANY position and folding the rest (an expunged VM included: its domain
    name used to come back from a snapshot, so libvirt events of that name went to the dead VM's stream)."""
    import orjson

    from moldd.projection.readmodel import ReadModel

    await client.call("createInstanceGroup", name="web")
    gone = await client.job("deployVirtualMachine", template="tiny", offering="small", group="web")
    await client.job("createVMSnapshot", id=gone["vm"], name="s1", snapshotmemory=True)
    await client.job("stopVirtualMachine", id=gone["vm"], forced=True)
    await client.call(
        "updateVirtualMachine", id=gone["vm"], displayname="going", details={"kernel_args": "x=1"}
    )
    await client.job("destroyVirtualMachine", id=gone["vm"], expunge=True)
    kept = await client.job("deployVirtualMachine", template="tiny", offering="small", ha=True)
    await client.job("rebootVirtualMachine", id=kept["vm"], forced=True)
    head, _ = await daemon.store.async_head()
    await daemon.projector.async_wait(head)
    live = daemon.projector.model
    events = await daemon.store.async_read(from_position=1, to_position=live.position)

    def state(model: ReadModel) -> Any:
        return orjson.loads(orjson.dumps(model.to_dict(), default=str)), dict(model.by_internal)

    full = ReadModel().apply_all(events)
    assert state(full) == state(live)
    for k in range(len(events) + 1):
        snapshot = orjson.loads(orjson.dumps(ReadModel().apply_all(events[:k]).to_dict(), default=str))
        restored = ReadModel.from_dict(snapshot).apply_all(events[k:])
        assert state(restored) == state(full), f"snapshot at position {k}"


async def test_resync_checks_a_difference_again_before_recording_it(
    daemon: Any, client: Client, clean_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync works from one listing of the host's domains while events keep being ingested: by the time it gets
    to a VM, the listing may be old. A difference is recorded only if libvirt still shows it."""
    from moldd.libvirt.host import DomainInfo

    job = await client.job("deployVirtualMachine", template="tiny", offering="small", host="host0")
    vm = await client.vm(job["vm"])
    await client.job("stopVirtualMachine", id=vm["name"], forced=True)
    conn = daemon.hosts.conns["host0"]

    async def old_listing() -> list[Any]:  # as listed just before the stop
        return [DomainInfo(name=vm["internal_name"], uuid=vm["uuid"], state="running", persistent=True)]

    monkeypatch.setattr(conn, "async_list_domains", old_listing)
    await daemon.hosts.async_resync("host0")
    after = await client.vm(vm["name"])
    assert (after["state"], after["power_state"]) == ("Stopped", "off")
    assert not [e for e in await client.events(vm["name"]) if e["event_type"] == "vm.reconciled"]


async def _async_gone(pid: int) -> None:
    """Wait until the process ``pid`` has died (a SIGKILL takes effect asynchronously)."""
    async with asyncio.timeout(scaled(10)):
        while True:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # dead, waiting to be reaped by its parent
            except (ProcessLookupError, FileNotFoundError):
                return
            await asyncio.sleep(0.02)
