"""``moldd-audit diff``: the log's view of the VMs against what the libvirt hosts actually run now.

The log is folded through the daemon's ReadModel; each host of the moldd configuration is opened with a
read-only libvirt connection (nothing is changed on any host) and its domains are listed.

Findings (``kind``):
  missing            the log has the VM (Created/Running/Stopped/Unknown) but no host has its domain
  wrong_host         its domain is on another host than the log says
  extra_copy         its domain is (also) active on a host other than the log's one
  wrong_power_state  the log says on and the domain is off, or the other way round
  unexpected_domain  the VM is Destroyed/Expunged in the log but its domain still exists
  unknown_domain     a domain moldd has never deployed (defined behind moldd's back)
VMs in progress (Starting, Stopping, ...) are listed as ``skipped``: the daemon finishes or reconciles them.

Exit: 0 no drift; 1 drift found; 2 could not check (bad input, or a host could not be listed and nothing
else drifted).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moldd.audit.errors import AuditError
from moldd.audit.log import log_info, open_log
from moldd.audit.state import fold
from moldd.config import Config, ConfigError, load_config
from moldd.domain.reconcile import is_on
from moldd.domain.states import TRANSIENT, PowerState

CONNECT_TIMEOUT_S = 15.0
GONE = ("Destroyed", "Expunged")
EXPECT_DOMAIN = ("Created", "Running", "Stopped", "Unknown")


@dataclass(frozen=True)
class Domain:
    host: str
    name: str
    uuid: str
    state: str
    persistent: bool


@dataclass
class Finding:
    kind: str
    vm: str | None
    domain: str
    host: str | None
    expected: str
    actual: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DiffResult:
    position: int
    findings: list[Finding] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    host_errors: dict[str, str] = field(default_factory=dict)
    hosts_checked: list[str] = field(default_factory=list)
    vms_checked: int = 0

    @property
    def exit_code(self) -> int:
        if self.findings:
            return 1
        return 2 if self.host_errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "drift": bool(self.findings),
            "findings": [f.to_dict() for f in self.findings],
            "skipped": self.skipped,
            "host_errors": self.host_errors,
            "hosts_checked": self.hosts_checked,
            "vms_checked": self.vms_checked,
            "exit_code": self.exit_code,
        }


def list_host_domains(name: str, uri: str, timeout: float = CONNECT_TIMEOUT_S) -> list[Domain]:
    """Every domain (active or defined) of one host, over a read-only connection. Raises AuditError.

    Runs in a daemon thread with a deadline: a hung libvirtd must not hang the audit."""
    result: list[Domain] = []
    error: list[str] = []

    def run() -> None:
        import libvirt

        from moldd.libvirt.events import state_name

        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            error.append(f"cannot connect read-only to {uri}: {exc.get_error_message()}")
            return
        try:
            for dom in conn.listAllDomains(0):
                try:
                    st = int(dom.state()[0])
                    result.append(
                        Domain(name, dom.name(), dom.UUIDString(), state_name(st), bool(dom.isPersistent()))
                    )
                except libvirt.libvirtError:
                    continue  # vanished while listing
        except libvirt.libvirtError as exc:
            error.append(f"cannot list the domains of {uri}: {exc.get_error_message()}")
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    t = threading.Thread(target=run, name=f"audit-diff-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AuditError(f"host {name} ({uri}) did not answer within {timeout:.0f} s", field="live")
    if error:
        raise AuditError(error[0], field="live")
    return sorted(result, key=lambda d: d.name)


def _load(config: str | Path | Config) -> Config:
    if isinstance(config, Config):
        return config
    if not Path(config).is_file():
        raise AuditError(f"--live {config}: no such configuration file", field="live")
    try:
        return load_config(config)
    except ConfigError as exc:
        raise AuditError(f"--live {exc.file}: key {exc.key}: {exc.reason}", field="live") from exc


def live_diff(db: str | Path, config: str | Path | Config, timeout: float = CONNECT_TIMEOUT_S) -> DiffResult:
    cfg = _load(config)
    with open_log(db) as conn:
        log_info(conn, db)
        model, _, _ = fold(conn)
    res = DiffResult(position=model.position)
    domains: list[Domain] = []
    for h in cfg.hosts:
        try:
            domains.extend(list_host_domains(h.name, h.uri, timeout))
            res.hosts_checked.append(h.name)
        except AuditError as exc:
            res.host_errors[h.name] = exc.message
    checked = set(res.hosts_checked)
    by_name: dict[str, list[Domain]] = {}
    for d in domains:
        by_name.setdefault(d.name, []).append(d)

    known: set[str] = set()
    for vm in sorted(model.vms.values(), key=lambda v: v.id):
        known.add(vm.internal_name)
        found = by_name.get(vm.internal_name, [])
        if vm.state in TRANSIENT:
            res.skipped.append({"vm": vm.name, "state": vm.state, "reason": "command in progress in the log"})
            continue
        if vm.host is not None and vm.host not in checked and vm.state not in GONE:
            res.skipped.append({"vm": vm.name, "state": vm.state, "reason": f"host {vm.host} not checked"})
            continue
        res.vms_checked += 1
        if vm.state in GONE:
            for d in found:
                res.findings.append(
                    Finding("unexpected_domain", vm.name, d.name, d.host, f"no domain ({vm.state})", d.state)
                )
            continue
        here = [d for d in found if d.host == vm.host]
        elsewhere = [d for d in found if d.host != vm.host]
        if not found:
            if vm.state in EXPECT_DOMAIN:
                res.findings.append(
                    Finding(
                        "missing", vm.name, vm.internal_name, vm.host, f"{vm.state} on {vm.host}", "absent"
                    )
                )
            continue
        if not here:
            d = elsewhere[0]
            res.findings.append(
                Finding("wrong_host", vm.name, d.name, d.host, f"on {vm.host}", f"on {d.host} ({d.state})")
            )
            continue
        for d in elsewhere:
            if is_on(d.state):
                res.findings.append(
                    Finding(
                        "extra_copy", vm.name, d.name, d.host, f"only on {vm.host}", f"{d.state} on {d.host}"
                    )
                )
        d = here[0]
        want_on = vm.power_state == PowerState.ON or vm.state == "Running"
        if vm.state in ("Running", "Stopped", "Created") and want_on != is_on(d.state):
            res.findings.append(
                Finding(
                    "wrong_power_state",
                    vm.name,
                    d.name,
                    d.host,
                    f"{vm.state} (power {vm.power_state})",
                    d.state,
                )
            )
    for d in domains:
        if d.name not in known:
            res.findings.append(Finding("unknown_domain", None, d.name, d.host, "no such domain", d.state))
    return res
