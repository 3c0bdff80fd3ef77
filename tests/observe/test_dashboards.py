"""The shipped Grafana dashboard and Prometheus alert rules name only metrics (and label values) that a real
daemon exposes: a renamed metric breaks this test, not an operator's pager at 3 a.m."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observe.test_metrics import scrape

pytestmark = pytest.mark.libvirt

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
DASHBOARD = CONTRIB / "grafana" / "moldd-dashboard.json"
ALERTS = CONTRIB / "prometheus" / "moldd-alerts.yml"
METRIC = re.compile(r"\b(moldd_[a-zA-Z0-9_]+)(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_and_rules_are_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert len(dashboard_exprs()) >= 20
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
    # the alerts the issue asks for
    joined = "\n".join(r["expr"] for r in alert_rules())
    for needle in ('health="FenceFailed"', 'state="Error"', "moldd_ha_watcher_restarts_total",
                   "moldd_log_commit_duration_seconds_bucket"):  # fmt: skip
        assert needle in joined


async def test_every_metric_and_label_value_named_exists(daemon: Any, client: Any) -> None:
    await client.call("listVirtualMachines")
    samples = await scrape(daemon)
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    missing = []
    for expr in exprs:
        for match in METRIC.finditer(expr):
            name, selector = match.group(1), match.group(2) or ""
            if name not in samples:
                missing.append(f"{name} (in {expr!r})")
                continue
            for label, op, want in MATCHER.findall(selector):
                have = {s.labels.get(label) for s in samples[name]}
                assert have != {None}, f"{name} has no label {label!r} (in {expr!r})"
                if op == "=":
                    wanted = [want]
                elif op == "=~":
                    wanted = want.split("|")
                else:
                    continue
                for w in wanted:
                    assert w in have, (
                        f"{name}{{{label}={w!r}}} is never exposed (have {sorted(map(str, have))})"
                    )
    assert not missing, "metrics named in contrib/ but not exposed: " + ", ".join(missing)
    # labels grouped by (and shown in legends / annotations) exist on a metric of that expression
    for expr, legends in _exprs_with_legends():
        names = {m.group(1) for m in METRIC.finditer(expr)}
        have = {k for n in names for s in samples.get(n, []) for k in s.labels}
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in have, f"{expr!r} groups by {label!r}, which its metrics do not have"
        for label in re.findall(r"\{\{\s*\$?(?:labels\.)?(\w+)\s*\}\}", legends):
            if label in ("value",):
                continue
            assert label in have, f"{expr!r} shows {{{{{label}}}}}, which its metrics do not have"


def _exprs_with_legends() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = [(t["expr"], t.get("legendFormat", "")) for p in doc["panels"] for t in p.get("targets", [])]
    for rule in alert_rules():
        if "up{" in rule["expr"]:
            continue  # Prometheus' own series
        out.append((rule["expr"], " ".join(rule.get("annotations", {}).values())))
    return out
