"""moldd-audit state replays the log through the daemon's own fold: the full replay equals what a running daemon
reports, and a replay to position P equals what the daemon showed when its replies carried position P."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moldd.audit.state import state_at
from moldd.cli.audit import main as audit
from moldlab.testing.harness import Client
from tests.audit.conftest import RecordedLog

pytestmark = pytest.mark.libvirt


def test_state_at_position_reproduces_what_the_daemon_showed_then(recorded_log: RecordedLog) -> None:
    labels = [m.label for m in recorded_log.moments]
    assert labels == [
        "empty",
        "deployed",
        "second created",
        "stopped",
        "started",
        "rebooted",
        "destroyed",
        "settled",
    ]
    for m in recorded_log.moments:
        st = state_at(recorded_log.db, at_position=m.position)
        assert st.model.position == m.position
        assert st.view()["vms"] == m.vms, m.label
    states = {m.label: {v["name"]: v["state"] for v in m.vms} for m in recorded_log.moments}
    main = recorded_log.vm_names["main"]
    assert [states[k].get(main) for k in ("deployed", "stopped", "started", "destroyed")] == [
        "Running", "Stopped", "Running", "Destroyed"
    ]  # fmt: skip


def test_full_replay_equals_the_daemon_before_and_after_a_restart(recorded_log: RecordedLog) -> None:
    view = state_at(recorded_log.db, at_position=recorded_log.live_position).view()
    assert view["vms"] == recorded_log.live_vms
    assert view["hosts"] == recorded_log.live_hosts
    # the restarted daemon restored its read model from a snapshot and folded the tail: same state
    view = state_at(recorded_log.db, at_position=recorded_log.restarted_position).view()
    assert view["vms"] == recorded_log.restarted_vms
    # and the whole log (the restart added host link events only) still shows the same VMs
    assert state_at(recorded_log.db).view()["vms"] == recorded_log.restarted_vms


async def test_full_replay_of_the_live_log_equals_listvirtualmachines_and_listhosts(
    client: Client, daemon: Any
) -> None:
    await client.call("createInstanceGroup", name="db", description="databases")
    a = await client.job("deployVirtualMachine", template="tiny", offering="small", group="db")
    b = await client.job("deployVirtualMachine", template="tiny", offering="medium")
    assert a["status"] == b["status"] == "succeeded"
    await client.job("stopVirtualMachine", id=b["vm"], forced=True)
    while True:  # both lists at one position (a libvirt event may land between the two calls)
        vms = await client.call("listVirtualMachines", listall=True)
        hosts = await client.call("listHosts")
        if vms["position"] == hosts["position"]:
            break
    # the live daemon's file, opened read-only while the daemon writes it, up to the position of the replies
    st = state_at(daemon.config.database, at_position=vms["position"]).view()
    assert st["vms"] == vms["result"]["virtualmachine"]
    assert st["hosts"] == hosts["result"]["host"]
    assert [g["name"] for g in st["groups"]] == ["db"]


def test_state_at_time_folds_events_recorded_until_then(recorded_log: RecordedLog, capsys: Any) -> None:
    stopped = next(m for m in recorded_log.moments if m.label == "stopped")
    st = state_at(recorded_log.db, at_position=stopped.position)
    assert st.recorded_at is not None
    by_time = state_at(recorded_log.db, at_time=st.recorded_at)
    assert by_time.model.position >= stopped.position
    assert by_time.model.vms[recorded_log.vm_names["main"]].state == "Stopped"
    before_all = state_at(recorded_log.db, at_time="2000-01-01T00:00:00Z")
    assert before_all.model.position == 0 and before_all.view()["vms"] == []
    # same through the CLI, with a zone offset
    assert (
        audit(["state", str(recorded_log.db), "--at-time", st.recorded_at.replace("Z", "+00:00"), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["position"] == by_time.model.position


def test_state_cli_prints_tables(recorded_log: RecordedLog, capsys: Any) -> None:
    assert audit(["state", str(recorded_log.db)]) == 0
    out = capsys.readouterr().out
    assert "VMs (2)" in out and "Hosts (2)" in out and "Groups (1)" in out
    assert recorded_log.vm_names["main"] in out and "Destroyed" in out
