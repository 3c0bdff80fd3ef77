"""moldd-audit diff against real lab hosts: no drift right after the daemon stops; then a VM destroyed behind
moldd's back (daemon stopped, so the log does not know), a VM powered off behind its back, and a domain
defined directly on a host are each reported, and the exit code says drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from moldd.cli.audit import main as audit
from moldlab import domain_xml
from moldlab.testing.harness import Client, running_daemon

pytestmark = pytest.mark.libvirt


def _diff(capsys: Any, db: Path, cfg: Path) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = audit(["diff", str(db), "--live", str(cfg), "--json"])
    return code, json.loads(capsys.readouterr().out)


async def test_diff_reports_changes_made_behind_moldds_back(
    config: Any, clean_lab: Any, guest_image: Any, capsys: Any
) -> None:
    async with running_daemon(config), Client(config.socket) as c:
        gone = await c.job("deployVirtualMachine", template="tiny", offering="small")
        off = await c.job("deployVirtualMachine", template="tiny", offering="small")
        kept = await c.job("deployVirtualMachine", template="tiny", offering="small")
        vms = {j["vm"]: await c.vm(j["vm"]) for j in (gone, off, kept)}
    code, report = _diff(capsys, config.database, config.path)
    assert code == 0, report
    assert report["findings"] == [] and report["vms_checked"] == 3 and len(report["hosts_checked"]) == 2

    hosts = {h.name: h for h in clean_lab.hosts}
    g, o = vms[gone["vm"]], vms[off["vm"]]
    conn = libvirt.open(hosts[g["host"]].uri)
    try:
        dom = conn.lookupByName(g["internal_name"])
        dom.destroy()
        dom.undefine()
    finally:
        conn.close()
    conn = libvirt.open(hosts[o["host"]].uri)
    try:
        conn.lookupByName(o["internal_name"]).destroy()
    finally:
        conn.close()
    extra_host = clean_lab.hosts[0]
    conn = libvirt.open(extra_host.uri)
    try:
        conn.defineXML(domain_xml("intruder", guest_image))
    finally:
        conn.close()

    code, report = _diff(capsys, config.database, config.path)
    assert code == 1
    found = {(f["kind"], f["vm"], f["domain"]) for f in report["findings"]}
    assert found == {
        ("missing", gone["vm"], g["internal_name"]),
        ("wrong_power_state", off["vm"], o["internal_name"]),
        ("unknown_domain", None, "intruder"),
    }
    intruder = next(f for f in report["findings"] if f["domain"] == "intruder")
    assert intruder["host"] == extra_host.name and intruder["actual"] == "shutoff"
    # the text form says the same
    assert audit(["diff", str(config.database), "--live", str(config.path)]) == 1
    out = capsys.readouterr().out
    assert "RESULT: DRIFT (exit 1)" in out and "intruder" in out and "missing" in out


@pytest.mark.parametrize("which", ["missing", "invalid"])
def test_diff_without_a_valid_config_could_not_check(
    recorded_log: Any, tmp_path: Path, capsys: Any, which: str
) -> None:
    cfg = tmp_path / "moldd.toml"
    if which == "invalid":
        cfg.write_text("[daemon]\nsocket = 3\n")
    assert audit(["diff", str(recorded_log.db), "--live", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--live" in err
