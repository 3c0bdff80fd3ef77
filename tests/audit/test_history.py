"""moldd-audit history: one VM's timeline with actors, command ids, libvirt events, state changes, HA causes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from events import NewEvent, SQLiteEventStore
from moldd.audit.history import vm_history
from moldd.cli.audit import main as audit
from tests.audit.conftest import RecordedLog


@pytest.mark.libvirt
def test_history_of_a_real_vm(recorded_log: RecordedLog) -> None:
    name = recorded_log.vm_names["main"]
    hist = vm_history(recorded_log.db, name)
    types = [e.type for e in hist.entries]
    for t in ("vm.deploy.requested", "vm.created", "vm.started", "vm.stop.requested", "vm.stopped",
              "vm.start.requested", "vm.reboot.requested", "vm.rebooted", "vm.destroy.requested", "vm.destroyed"):  # fmt: skip
        assert t in types, t
    positions = [e.position for e in hist.entries]
    assert positions == sorted(positions)
    commands = [e for e in hist.entries if e.kind == "command" and e.command_id]
    assert {e.type for e in commands} >= {"vm.deploy.requested", "vm.stop.requested", "vm.destroy.requested"}
    for e in commands:
        assert e.uid == recorded_log.uid and e.actor.startswith(f"uid={recorded_log.uid}")
    # outcomes point back at their command
    stop = next(e for e in commands if e.type == "vm.stop.requested")
    stopped = next(e for e in hist.entries if e.type == "vm.stopped")
    assert stopped.causation_id == stop.command_id and stopped.correlation_id == stop.command_id
    assert (stop.state_before, stop.state_after) == ("Running", "Stopping")
    assert (stopped.state_before, stopped.state_after) == ("Stopping", "Stopped")
    assert stopped.power_after == "off"
    libvirt_events = [e for e in hist.entries if e.kind == "libvirt"]
    assert libvirt_events and all(e.host and e.host.startswith("host") for e in libvirt_events)
    assert {e.payload["event"] for e in libvirt_events} >= {"STARTED", "STOPPED"}
    # the same VM by numeric id and by internal name
    assert vm_history(recorded_log.db, str(hist.id)).entries == hist.entries
    assert vm_history(recorded_log.db, hist.internal_name).entries == hist.entries


@pytest.mark.libvirt
def test_history_cli_table_and_json(recorded_log: RecordedLog, capsys: Any) -> None:
    name = recorded_log.vm_names["main"]
    assert audit(["history", str(recorded_log.db), name]) == 0
    out = capsys.readouterr().out
    assert "vm.stop.requested" in out and "Running/on@" in out and "-> Stopping" in out
    assert audit(["history", str(recorded_log.db), name, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vm"] == name and data["entries"][0]["type"] == "vm.deploy.requested"


async def _ha_log(path: Path) -> None:
    store = await SQLiteEventStore.async_open(path)
    try:
        deploy = {
            "name": "vm-1", "id": 1, "internal_name": "i-1-VM", "display_name": "a", "hostname": "a",
            "host": "h1", "cluster": "c1", "offering": {"name": "small"}, "ha_enabled": True,
        }  # fmt: skip
        await store.async_append(
            "vm-vm-1", [NewEvent("vm.deploy.requested", deploy, actor="uid=0(root) gid=0 pid=1")]
        )
        await store.async_append(
            "vm-vm-1", [NewEvent("vm.created", {"host": "h1"}), NewEvent("vm.started", {"host": "h1"})]
        )
        await store.async_append(
            "vm-vm-1",
            [NewEvent("libvirt.domain_event", {"host": "h1", "domain": "i-1-VM", "event": "STOPPED", "detail": "CRASHED"}, actor="libvirt")],
        )  # fmt: skip
        await store.async_append(
            "vm-vm-1", [NewEvent("ha.restart.scheduled", {"cause": "crashed", "delay_s": 1}, actor="ha")]
        )
        await store.async_append(
            "vm-vm-1", [NewEvent("ha.restart.started", {"host": "h2", "cause": "crashed"}, actor="ha")]
        )
        await store.async_append("vm-vm-1", [NewEvent("ha.restart.succeeded", {"host": "h2"}, actor="ha")])
        await store.async_append(
            "host-h1", [NewEvent("host.link", {"kind": "disconnected"}, actor="libvirt")]
        )
    finally:
        await store.async_close()


async def test_history_shows_ha_decisions_with_their_cause(tmp_path: Path) -> None:
    db = tmp_path / "ha.db"
    await _ha_log(db)
    hist = vm_history(db, "vm-1")
    ha = [e for e in hist.entries if e.kind == "ha"]
    assert [e.type for e in ha] == ["ha.restart.scheduled", "ha.restart.started", "ha.restart.succeeded"]
    assert ha[0].cause == "crashed" and ha[0].actor == "ha" and ha[0].uid is None
    assert (ha[1].state_before, ha[1].state_after) == ("Stopped", "Starting")
    assert (ha[2].host_before, ha[2].host_after, ha[2].state_after) == ("h2", "h2", "Running")
    crash = next(e for e in hist.entries if e.kind == "libvirt")
    assert crash.host == "h1" and (crash.state_before, crash.state_after) == ("Running", "Stopped")
    assert crash.cause == "crashed"  # the projection's stop cause
    assert "host.link" not in [e.type for e in hist.entries]
    assert hist.entries[0].uid == 0 and hist.entries[0].user == "root"
