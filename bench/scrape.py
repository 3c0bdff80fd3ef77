"""What an operator's watching costs the daemon's loop: ``GET /metrics`` and ``GET /v1/status`` rendered from a
read model of N VMs (20 hosts, a job per VM), cold (after a change: the fold moved) and warm (nothing changed
since the last scrape), beside the ``listVirtualMachines`` encoding of the same VMs as the reference.

    python bench/scrape.py [--vms 1000 10000] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from bench.common import footer, header
from moldd.api.handlers import dumps
from moldd.observe.metrics import Metrics
from moldd.observe.web import status_document
from moldd.projection.model import VM, Host, Job
from moldd.projection.readmodel import ReadModel

STATES = ("Running", "Stopped", "Starting", "Error")


def build(n: int) -> tuple[Any, ReadModel]:
    model = ReadModel()
    hosts = [f"h{i}" for i in range(20)]
    for h in hosts:
        model.hosts[h] = Host(name=h, uri="qemu:///system", cluster="c1", max_vms=n, link="connected")
    for i in range(n):
        model.vms[f"vm{i}"] = VM(
            name=f"vm{i}", id=i, internal_name=f"i-{i}", display_name=f"vm{i}", hostname=f"vm{i}",
            state=STATES[i % 4], power_state="on" if i % 4 == 0 else "off", host=hosts[i % 20], cluster="c1",
            ha_enabled=bool(i % 2),
        )  # fmt: skip
        model.jobs[f"j{i}"] = Job(
            id=f"j{i}",
            command="vm.deploy",
            vm=f"vm{i}",
            status="succeeded",
            created_at="",
            actor="x",
            position=i,
        )
    model.position = 2 * n
    cfg_hosts = [SimpleNamespace(name=h, cluster="c1", max_vms=n, uri="qemu:///system") for h in hosts]
    config = SimpleNamespace(
        hosts=cfg_hosts,
        tolerated_host_failures=1,
        host=lambda name: next((c for c in cfg_hosts if c.name == name), None),
    )
    app = SimpleNamespace(
        model=model, config=config, verbs=lambda: ["listVirtualMachines"], health_checks={}, followers=0,
        health=lambda: {"ok": True, "alerts": []},
    )  # fmt: skip
    return app, model


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(n: int, runs: int) -> dict[str, float]:
    app, model = build(n)
    metrics = Metrics()
    metrics.bind(app, None)

    def cold() -> None:
        model.position += 1
        metrics.exposition()

    row = {
        "vms": float(n),
        "metrics_cold_ms": median_ms(cold, runs),
        "metrics_warm_ms": median_ms(metrics.exposition, runs),
        "status_ms": median_ms(lambda: dumps({"ok": True, "result": status_document(app)}), runs),
        "list_vms_ms": median_ms(lambda: dumps([vm.view() for vm in model.vms.values()]), runs),
    }
    row["status_vs_list"] = row["status_ms"] / row["list_vms_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=7)
    ns = parser.parse_args()
    header("scrape: /metrics and /v1/status cost on the loop")
    rows = []
    for n in ns.vms:
        row = measure(n, ns.runs)
        rows.append(row)
        print(
            f"{n:>6} VMs: /metrics cold {row['metrics_cold_ms']:.1f} ms, warm {row['metrics_warm_ms']:.1f} ms; "
            f"/v1/status {row['status_ms']:.1f} ms = {row['status_vs_list']:.2f} x listVirtualMachines' encoding",
            flush=True,
        )
    footer()
    print(json.dumps({"bench": "scrape", "runs": ns.runs, "results": rows}))


if __name__ == "__main__":
    main()
