"""Fixtures of the audit tests: the daemon fixtures of tests/daemon, and one real log recorded by a real daemon
driving real VMs on the lab hosts (deploy, stop, start, reboot, destroy), with signed checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moldd.cli.audit import main as audit_main
from moldlab.testing.harness import Client, running_daemon, write_config
from moldlab.testing.load import scaled
from tests.daemon.conftest import *  # noqa: F403  (clean_lab, make_config, config, daemon, client, ...)
from tests.daemon.conftest import wipe_lab


@dataclass
class Moment:
    label: str
    position: int
    vms: list[dict[str, Any]]


@dataclass
class RecordedLog:
    root: Path
    db: Path  # the daemon's log, after the daemon stopped (WAL checkpointed): copy it before tampering
    checkpoints: Path
    public_key: Path
    private_key: Path
    moments: list[Moment] = field(default_factory=list)
    live_vms: list[dict[str, Any]] = field(default_factory=list)  # listVirtualMachines at the end
    live_hosts: list[dict[str, Any]] = field(default_factory=list)  # listHosts at the end
    restarted_vms: list[dict[str, Any]] = field(default_factory=list)  # after a restart (snapshot + tail)
    restarted_position: int = 0
    live_position: int = 0
    vm_names: dict[str, str] = field(default_factory=dict)  # role -> VM name
    daemon_checkpoint_lines: int = 0
    uid: int = field(default_factory=os.getuid)

    def copy(self, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / "log.db"
        shutil.copyfile(self.db, out)
        for suffix in ("-wal", "-shm"):
            src = Path(str(self.db) + suffix)
            if src.exists():
                shutil.copyfile(src, Path(str(out) + suffix))
        return out


async def _vms(c: Client) -> Moment:
    reply = await c.call("listVirtualMachines", listall=True)
    return Moment("", reply["position"], reply["result"]["virtualmachine"])


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {scaled(timeout):g} s")
        await asyncio.sleep(0.05)


async def _until_undefined_event(c: Client, vm: str) -> None:
    async def seen() -> bool:
        events = await c.events(vm, type="libvirt.domain_event")
        return any(e["payload"].get("event") == "UNDEFINED" for e in events)

    await _until(seen, f"no libvirt UNDEFINED event of {vm} in the log")


async def _until_checkpointed(file: Path, position: int) -> None:
    """A checkpoint the daemon signed on its schedule covers ``position``."""

    async def covered() -> bool:
        lines = file.read_text().splitlines() if file.exists() else []
        return any(json.loads(line)["position"] >= position for line in lines if line.strip())

    await _until(covered, f"no scheduled checkpoint covering position {position}")


async def _drive(rec: RecordedLog, config: Any) -> None:
    async with running_daemon(config), Client(config.socket) as c:

        async def moment(label: str) -> None:
            m = await _vms(c)
            m.label = label
            rec.moments.append(m)

        await moment("empty")
        await c.call("createInstanceGroup", name="web", description="front ends")
        web = await c.job(
            "deployVirtualMachine", template="tiny", offering="small", displayname="Web 1", group="web"
        )
        assert web["status"] == "succeeded", web
        name = web["vm"]
        rec.vm_names["main"] = name
        await moment("deployed")
        other = await c.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        rec.vm_names["other"] = other["vm"]
        await moment("second created")
        assert (await c.job("stopVirtualMachine", id=name, forced=True))["status"] == "succeeded"
        await moment("stopped")
        assert (await c.job("startVirtualMachine", id=name))["status"] == "succeeded"
        await c.wait_vm(name, state="Running", power_state="on")
        await moment("started")
        # forced: a reset, whether or not the just-started guest already listens to ACPI (a busy machine)
        assert (await c.job("rebootVirtualMachine", id=name, forced=True))["status"] == "succeeded"
        await moment("rebooted")
        assert (await c.job("destroyVirtualMachine", id=name))["status"] == "succeeded"
        await moment("destroyed")
        await _until_undefined_event(c, name)  # the last libvirt event of the destroyed domain is in the log
        await moment("settled")
        while True:  # both lists at one position (a libvirt event may land between the two calls)
            final = await _vms(c)
            hosts = await c.call("listHosts")
            if hosts["position"] == final.position:
                break
        rec.live_vms, rec.live_hosts, rec.live_position = final.vms, hosts["result"]["host"], final.position
        await _until_checkpointed(config.checkpoints.file, final.position)  # by the daemon's own schedule
    # a restart restores from the projection snapshot and folds the tail: must show the same as a full replay
    async with running_daemon(config), Client(config.socket) as c:
        m = await _vms(c)
        rec.restarted_vms, rec.restarted_position = m.vms, m.position


@pytest.fixture(scope="package")
def recorded_log(
    lab: Any, guest_image: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordedLog]:
    root = tmp_path_factory.mktemp("audit-log") / "moldd"
    wipe_lab(lab)
    assert audit_main(["keygen", str(root / "keys")]) == 0
    config = write_config(root, lab.hosts, guest_image, checkpoints=True)
    assert config.checkpoints.key == root / "keys" / "checkpoint.key"
    rec = RecordedLog(
        root=root,
        db=config.database,
        checkpoints=root / "checkpoints.jsonl",
        public_key=root / "keys" / "checkpoint.pub",
        private_key=root / "keys" / "checkpoint.key",
    )
    try:
        asyncio.run(_drive(rec, config))
    finally:
        wipe_lab(lab)
    rec.daemon_checkpoint_lines = len(rec.checkpoints.read_text().splitlines())
    # seal the final head too (what an operator does before taking a copy off the host)
    assert (
        audit_main(["checkpoint", str(rec.db), "--key", str(rec.private_key), "--out", str(rec.checkpoints)])
        == 0
    )
    yield rec


def drop_triggers(db: Path) -> sqlite3.Connection:
    """What an attacker holding the file does first: remove the append-only triggers."""
    conn = sqlite3.connect(db, isolation_level=None)
    for name in ("events_no_update", "events_no_delete", "commands_no_update", "commands_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    return conn


@pytest.fixture
def tampered_copy(recorded_log: RecordedLog, tmp_path: Path) -> Callable[[], tuple[Path, sqlite3.Connection]]:
    def make() -> tuple[Path, sqlite3.Connection]:
        db = recorded_log.copy(tmp_path / "copy")
        return db, drop_triggers(db)

    return make
