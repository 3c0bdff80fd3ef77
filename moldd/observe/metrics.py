"""Prometheus metrics, with the official ``prometheus_client`` library (no hand-written exposition text).

Two kinds of figures:

* **read at scrape time** (:class:`ReadModelCollector`): VMs by state and power state, hosts by health and link,
  cluster headroom, jobs by status, log head and projection positions, the writer's queue depth, API
  connections and event followers. Nothing has to be kept in step: the read model is the truth.
* **counted as it happens**: HA restarts/failures/give-ups and fencing, derived from the log entries the
  projection folds (:meth:`Metrics.on_event`, a projector listener), so every figure is one the log can back;
  command latency (:meth:`Metrics.observe_command`, a hook in ``App.async_dispatch``) and log group commits
  (:meth:`Metrics.observe_commit`, the writer's ``on_commit`` hook).

Every metric lives in the :class:`Metrics` object's own registry (not the process-global one), so two daemons
in one test process do not mix. Labels are bounded: states, health values, causes and verbs come from fixed
sets (an unknown value is counted as ``other``); host and cluster names come from the configuration. VM names
are never labels.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from moldd.domain.ha import DownCause
from moldd.domain.states import PowerState, VMState

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "ReadModelCollector"]

HEALTHS = ("Up", "Suspect", "Down", "Fencing", "Fenced", "FenceFailed")
LINKS = ("connected", "disconnected", "unknown")
POWER_STATES = tuple(p.value for p in PowerState)  # on, off, paused, unknown
JOB_STATUSES = ("pending", "running", "succeeded", "failed")
CAUSES = frozenset(str(c) for c in DownCause)
HA_DECISIONS = {
    "ha.restart.scheduled": "restart",
    "ha.waiting": "wait",
    "ha.not_restarted": "not_restarted",
    "ha.gave_up": "gave_up",
    "ha.cancelled": "cancelled",
}

# Latency buckets (seconds). Commands range from a read of the model (~100 µs) to a deploy reply; group
# commits are one fsync (~1 ms on an SSD, 10+ ms on a busy disk); HA decisions include a backoff delay.
COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DECISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FENCE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TRIGGERS_KEPT = 4096
_STATE_POWER = attrgetter("state", "power_state")
_HOST_STATE = attrgetter("host", "state")
_STATUS = attrgetter("status")  # recent trigger positions remembered for the decision-latency histogram


def _cause(value: object) -> str:
    text = str(value) if value is not None else "other"
    return text if text in CAUSES else "other"


def _epoch(at: Any) -> float | None:
    return float(at.timestamp()) if hasattr(at, "timestamp") else None


@dataclass(frozen=True)
class _Tallies:
    vms: dict[tuple[str, str], int]
    ha_status: dict[str, int]
    ha_enabled: int
    jobs: dict[str, int]
    placed: dict[str, int]


class ReadModelCollector(Collector):
    """Gauges computed from the daemon's read model and live objects at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._cached: tuple[tuple[int, int], _Tallies] | None = None

    def tallies(self, model: Any) -> _Tallies:
        """Counts over every VM and job, recomputed only when the fold has moved (every change to the read
        model advances its position), so frequent scrapes of a quiet daemon cost nothing per VM."""
        key = (id(model), model.position)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        # Tally over attribute tuples: one C-speed pass per figure
        all_vms = list(model.vms.values())
        counts: dict[tuple[str, str], int] = {(str(s), p): 0 for s in VMState for p in POWER_STATES}
        for (state, power), n in Tally(map(_STATE_POWER, all_vms)).items():
            k = (str(state), power if power in POWER_STATES else "unknown")
            counts[k] = counts.get(k, 0) + n
        gone = (VMState.EXPUNGED, VMState.DESTROYED)
        ha_status: dict[str, int] = {"none": 0, "pending": 0, "restarting": 0, "failed": 0}
        ha_counts = Tally(vm.ha_status for vm in all_vms if vm.ha_enabled and vm.state not in gone)
        for st, n in ha_counts.items():
            ha_status[st if st in ha_status else "none"] += n
        jobs = Tally(map(_STATUS, model.jobs.values()))
        result = _Tallies(
            vms=counts,
            ha_status=ha_status,
            ha_enabled=sum(ha_counts.values()),
            jobs={status: jobs.get(status, 0) for status in JOB_STATUSES},
            placed=host_counts(model)[0],
        )
        self._cached = (key, result)
        return result

    def collect(self) -> Iterator[Metric]:
        m = self._m
        model = m.model()
        if model is None:
            return
        t = self.tallies(model)
        vms = GaugeMetricFamily(
            "moldd_vms", "VMs known to moldd, by state and power state", labels=["state", "power_state"]
        )
        counts, ha_status, ha_enabled = t.vms, t.ha_status, t.ha_enabled
        for (state, power), n in sorted(counts.items()):
            vms.add_metric([state, power], n)
        yield vms
        ha = GaugeMetricFamily(
            "moldd_vms_ha", "HA-enabled VMs (not destroyed), by HA status", labels=["ha_status"]
        )
        for status, n in ha_status.items():
            ha.add_metric([status], n)
        yield ha
        yield GaugeMetricFamily(
            "moldd_vms_ha_enabled", "VMs with HA enabled (not destroyed)", value=ha_enabled
        )

        hosts = GaugeMetricFamily("moldd_hosts", "Hosts by health and link", labels=["health", "link"])
        by: dict[tuple[str, str], int] = {(h, li): 0 for h in HEALTHS for li in LINKS}
        per_host = GaugeMetricFamily(
            "moldd_host_health",
            "1 for the health each configured host is in, 0 for the others",
            labels=["host", "cluster", "health"],
        )
        per_link = GaugeMetricFamily(
            "moldd_host_connected", "1 while moldd's libvirt connection to the host is up", labels=["host"]
        )
        for h in model.hosts.values():
            health = h.health if h.health in HEALTHS else "Down"
            link = h.link if h.link in LINKS else "unknown"
            by[(health, link)] += 1
            for value in HEALTHS:
                per_host.add_metric([h.name, h.cluster, value], 1.0 if value == health else 0.0)
            per_link.add_metric([h.name], 1.0 if link == "connected" else 0.0)
        for (health, link), n in by.items():
            hosts.add_metric([health, link], n)
        yield hosts
        yield per_host
        yield per_link

        caps = m.capacities(t.placed)
        if caps is not None:
            headroom = GaugeMetricFamily(
                "moldd_cluster_headroom_vms",
                "VM slots left in the cluster under its N-k host-failure rule",
                labels=["cluster"],
            )
            used = GaugeMetricFamily(
                "moldd_cluster_used_vms", "VM slots used in the cluster", labels=["cluster"]
            )
            limit = GaugeMetricFamily(
                "moldd_cluster_limit_vms",
                "VM slots usable in the cluster under its N-k rule",
                labels=["cluster"],
            )
            for c in caps:
                headroom.add_metric([c.cluster], c.headroom)
                used.add_metric([c.cluster], c.used)
                limit.add_metric([c.cluster], c.limit)
            yield headroom
            yield used
            yield limit

        jobs = GaugeMetricFamily("moldd_jobs", "Jobs in the read model, by status", labels=["status"])
        for status, n in t.jobs.items():
            jobs.add_metric([status], n)
        yield jobs

        yield GaugeMetricFamily(
            "moldd_projection_position", "Log position folded into the read model", value=model.position
        )
        head = m.log_head()
        if head is not None:
            yield GaugeMetricFamily(
                "moldd_log_head_position", "Position of the newest committed log entry", value=head
            )
        depth = m.queue_depth()
        if depth is not None:
            yield GaugeMetricFamily(
                "moldd_log_append_queue_depth", "Append requests waiting for the log writer", value=depth
            )
        yield GaugeMetricFamily(
            "moldd_api_connections", "Open HTTP connections on the API listeners", value=m.connections()
        )
        yield GaugeMetricFamily(
            "moldd_api_event_followers",
            "Clients following the event log live (NDJSON or SSE)",
            value=m.followers(),
        )
        cluster = m.cluster
        if cluster is not None:  # several nodes share a PostgreSQL log (moldd.cluster.ClusterRole)
            try:
                leading = bool(cluster.is_leading())
            except Exception:
                leading = False
            yield GaugeMetricFamily(
                "moldd_leader", "1 while this node leads the cluster (writes the log, runs HA)", value=leading
            )
            yield GaugeMetricFamily(
                "moldd_leader_acting", "1 while this node leads and has taken charge of the hosts",
                value=bool(getattr(cluster, "acting", False)),
            )  # fmt: skip
            yield GaugeMetricFamily(
                "moldd_leader_epoch", "The newest leadership epoch this node knows (0: none yet)",
                value=int(getattr(cluster, "epoch", None) or 0),
            )  # fmt: skip
            terms = CounterMetricFamily("moldd_leader_terms", "Times this node was elected leader")
            terms.add_metric([], int(getattr(cluster, "terms", 0) or 0))
            yield terms
        yield GaugeMetricFamily(
            "moldd_ha_watchers_healthy",
            "1 while every HA watcher task runs",
            value=1.0 if m.ha_healthy() else 0.0,
        )


class Metrics:
    """Every moldd metric, in one registry. Wire it with :meth:`bind` (the daemon does)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._command_children: dict[tuple[str, str], Any] = {}  # (verb, outcome) -> its histogram
        self.command_seconds = Histogram(
            "moldd_command_duration_seconds",
            "Time from a command's arrival to its reply, by verb and outcome (ok or the error code)",
            ["verb", "outcome"],
            buckets=COMMAND_BUCKETS,
            registry=r,
        )
        self.log_events = Counter("moldd_log_appended_events", "Events appended to the log", registry=r)
        self.log_groups = Counter(
            "moldd_log_commit_groups", "Group commits (one durable transaction each)", registry=r
        )
        self.log_commit_seconds = Histogram(
            "moldd_log_commit_duration_seconds",
            "Time of one group commit (the transaction and its fsync)",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.log_commit_failures = Counter(
            "moldd_log_commit_failures", "Group commits that failed (nothing of them was written)", registry=r
        )
        self.ha_restarts = Counter(
            "moldd_ha_restarts",
            "VMs HA restarted successfully, by what took them down",
            ["cause"],
            registry=r,
        )
        self.ha_failures = Counter(
            "moldd_ha_restart_failures", "HA restart attempts that failed, by cause", ["cause"], registry=r
        )
        self.ha_give_ups = Counter(
            "moldd_ha_give_ups", "VMs HA gave up on (restart budget spent), by cause", ["cause"], registry=r
        )
        self.ha_decision_seconds = Histogram(
            "moldd_ha_decision_seconds",
            "Time from the log entry of a libvirt event (or resync finding) to HA's first decision about it",
            ["decision"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.fence_attempts = Counter(
            "moldd_fence_attempts", "Fence commands run, by outcome (ok, failed)", ["outcome"], registry=r
        )
        self.fence_seconds = Histogram(
            "moldd_fence_duration_seconds",
            "Run time of fence commands",
            ["outcome"],
            buckets=FENCE_BUCKETS,
            registry=r,
        )
        self.host_health_changes = Counter(
            "moldd_host_health_changes",
            "Host health transitions, by the health entered",
            ["health"],
            registry=r,
        )
        self.libvirt_reconnects = Counter(
            "moldd_libvirt_reconnects",
            "libvirt connections re-established after a loss",
            ["host"],
            registry=r,
        )
        self.libvirt_disconnects = Counter(
            "moldd_libvirt_disconnects", "libvirt connections lost", ["host"], registry=r
        )
        self.libvirt_events = Counter(
            "moldd_libvirt_domain_events", "libvirt domain events recorded in the log", registry=r
        )
        self.watcher_restarts = Counter(
            "moldd_ha_watcher_restarts", "HA watcher tasks restarted after a crash", ["watcher"], registry=r
        )
        for cause in sorted(CAUSES):  # every series exists from the first scrape (rate() needs a zero)
            self.ha_restarts.labels(cause)
            self.ha_failures.labels(cause)
            self.ha_give_ups.labels(cause)
        for outcome in ("ok", "failed"):
            self.fence_attempts.labels(outcome)
            self.fence_seconds.labels(outcome)
        for health in HEALTHS:
            self.host_health_changes.labels(health)
        for decision in HA_DECISIONS.values():
            self.ha_decision_seconds.labels(decision)
        for watcher in ("vm-watcher", "host-watcher"):
            self.watcher_restarts.labels(watcher)

        self.verbs: frozenset[str] = frozenset()
        # the daemon's cluster role when the log lives on PostgreSQL (``is_leading()``, ``epoch``, ``acting``,
        # ``terms``); None for a single node
        self.cluster: Any = None
        self._app: Any = None
        self._store: Any = None
        self._servers: list[Any] = []
        self._known_hosts: set[str] = set()
        self._linked: set[str] = set()
        self._triggers: OrderedDict[int, float] = OrderedDict()
        self.registry.register(ReadModelCollector(self))

    # -- wiring ----------------------------------------------------------------------------------------
    def bind(self, app: Any, store: Any) -> None:
        """Read the model, capacities and health from ``app`` (``moldd.app.service.App``) and ``store``."""
        self._app = app
        self._store = store
        self.verbs = frozenset(app.verbs())
        self._command_children.clear()
        for verb in self.verbs:  # each verb's "ok" series exists from the start (rate() needs a zero)
            self.command_seconds.labels(verb, "ok")
        for h in app.config.hosts:
            self.libvirt_reconnects.labels(h.name)
            self.libvirt_disconnects.labels(h.name)
        writer = getattr(store, "_writer", None)
        if writer is not None and hasattr(writer, "on_commit"):
            writer.on_commit = self.observe_commit

    def track_server(self, server: Any) -> Callable[[], None]:
        """Count ``server.connections`` (an aiohttp ``web.Server``) in ``moldd_api_connections``; returns the
        undo."""
        self._servers.append(server)
        return lambda: self._servers.remove(server) if server in self._servers else None

    # -- scrape-time readers ---------------------------------------------------------------------------
    def model(self) -> Any:
        return self._app.model if self._app is not None else None

    def capacities(self, placed: dict[str, int] | None = None) -> list[Any] | None:
        if self._app is None:
            return None
        return cluster_capacities(self._app.config, self._app.model, placed)

    def log_head(self) -> int | None:
        writer = getattr(self._store, "_writer", None)
        return getattr(writer, "head_position", None)

    def queue_depth(self) -> int | None:
        writer = getattr(self._store, "_writer", None)
        queue = getattr(writer, "_queue", None)
        return len(queue) if queue is not None else None

    def connections(self) -> int:
        return sum(len(getattr(s, "connections", ())) for s in self._servers)

    def followers(self) -> int:
        return int(getattr(self._app, "followers", 0))

    def ha_healthy(self) -> bool:
        check = getattr(self._app, "health_checks", {}).get("ha")
        try:
            return bool(check()) if check is not None else True
        except Exception:
            return False

    def exposition(self) -> bytes:
        """The text exposition format of every metric (what ``GET /metrics`` returns)."""
        return generate_latest(self.registry)

    # -- hooks -----------------------------------------------------------------------------------------
    def observe_command(self, verb: str, outcome: str, seconds: float) -> None:
        """``App.async_dispatch`` calls this once per command (``outcome``: ``ok`` or the error code)."""
        key = (verb, outcome)
        child = self._command_children.get(key)
        if child is None:  # labels() takes a lock and builds its key on every call: asked once per pair
            child = self.command_seconds.labels(verb if verb in self.verbs else "unknown", outcome)
            if len(self._command_children) < 4096:
                self._command_children[key] = child
        child.observe(seconds)

    def observe_commit(self, events: int, seconds: float, ok: bool) -> None:
        """The log writer calls this after each group commit (``events`` appended, its duration)."""
        if ok:
            self.log_groups.inc()
            self.log_events.inc(events)
            self.log_commit_seconds.observe(seconds)
        else:
            self.log_commit_failures.inc()

    def on_event(self, ev: Any, model: Any) -> None:
        """Projector listener: count what the log says happened (after the fold of ``ev``)."""
        t: str = ev.event_type
        p = ev.payload if isinstance(ev.payload, dict) else {}
        if t == "libvirt.domain_event" or t == "vm.reconciled":
            if t == "libvirt.domain_event":
                self.libvirt_events.inc()
            at = _epoch(ev.recorded_at)
            if at is not None:
                self._triggers[ev.position] = at
                if len(self._triggers) > _TRIGGERS_KEPT:
                    self._triggers.popitem(last=False)
        elif t in HA_DECISIONS:
            trigger = p.get("trigger_position")
            at = self._triggers.pop(trigger, None) if isinstance(trigger, int) else None
            now = _epoch(ev.recorded_at)
            if at is not None and now is not None:
                self.ha_decision_seconds.labels(HA_DECISIONS[t]).observe(max(0.0, now - at))
            if t == "ha.gave_up":
                self.ha_give_ups.labels(_cause(p.get("cause"))).inc()
        elif t == "ha.restart.succeeded":
            self.ha_restarts.labels(_cause(p.get("cause"))).inc()
        elif t == "ha.restart.failed":
            self.ha_failures.labels(_cause(p.get("cause"))).inc()
        elif t == "ha.watcher_restarted":
            watcher = str(p.get("watcher"))
            self.watcher_restarts.labels(
                watcher if watcher in ("vm-watcher", "host-watcher") else "other"
            ).inc()
        elif t == "host.health":
            to = str(p.get("to"))
            self.host_health_changes.labels(to if to in HEALTHS else "other").inc()
            fence = p.get("fence")
            if isinstance(fence, dict):
                outcome = "ok" if fence.get("ok") else "failed"
                self.fence_attempts.labels(outcome).inc()
                seconds = fence.get("seconds")
                if isinstance(seconds, (int, float)):
                    self.fence_seconds.labels(outcome).observe(float(seconds))
        elif t == "host.link":
            host = ev.stream_id.removeprefix("host-")
            if host not in self._known_hosts and self._app is not None:
                if self._app.config.host(host) is None:
                    return  # not a configured host: no label for it
                self._known_hosts.add(host)
            kind = p.get("kind")
            if kind == "connected":
                if host in self._linked:
                    self.libvirt_reconnects.labels(host).inc()
                self._linked.add(host)
            elif kind == "disconnected":
                self._linked.add(host)  # the next "connected" is a reconnect
                self.libvirt_disconnects.labels(host).inc()


def host_counts(model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """VMs holding a slot on each host, and those running there, in ONE pass over the VMs (the per-host
    ``model.vms_on`` would scan every VM once per host)."""
    gone = (VMState.EXPUNGED, VMState.DESTROYED)
    pairs = Tally(map(_HOST_STATE, model.vms.values()))
    placed: dict[str, int] = {}
    running: dict[str, int] = {}
    for (host, state), n in pairs.items():
        if host is None or state in gone:
            continue
        placed[host] = placed.get(host, 0) + n
        if state == VMState.RUNNING:
            running[host] = running.get(host, 0) + n
    return placed, running


def cluster_capacities(config: Any, model: Any, placed: dict[str, int] | None = None) -> list[Any]:
    """What ``moldd.app.placement.capacities`` returns (same rule, from the domain), counted in one pass."""
    from moldd.domain.capacity import HostLoad, cluster_capacity

    if placed is None:
        placed = host_counts(model)[0]
    loads = []
    for h in config.hosts:
        state = model.hosts.get(h.name)
        up = state is None or (state.health == "Up" and state.link == "connected")
        loads.append(
            HostLoad(name=h.name, cluster=h.cluster, max_vms=h.max_vms, vms=placed.get(h.name, 0), up=up)
        )
    return [
        cluster_capacity(c, loads, config.tolerated_host_failures)
        for c in sorted({h.cluster for h in config.hosts})
    ]


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes now (``_total``, ``_bucket``, ``_count``... included)."""
    names: set[str] = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return names


def timer() -> Callable[[], float]:
    """Seconds since the call, for hooks: ``elapsed = timer(); ...; elapsed()``."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def families(text: str) -> Iterable[Any]:
    """Parse exposition text with the client library's own parser (tests, the dashboard check)."""
    from prometheus_client.parser import text_string_to_metric_families

    return text_string_to_metric_families(text)
