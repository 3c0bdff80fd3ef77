"""The capacity rule (Mold manual): a cluster of N hosts holds at most (N - k) x per-host limit VMs, so that
its VMs still fit after k host failures (k = 1 by default). Also host choice for placement."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moldd.domain.errors import CapacityError


@dataclass(frozen=True)
class HostLoad:
    name: str
    cluster: str
    max_vms: int
    vms: int  # VMs that count against the host: every non-destroyed VM placed there
    up: bool = True


@dataclass(frozen=True)
class ClusterCapacity:
    cluster: str
    hosts: int
    per_host_limit: int
    tolerated_failures: int
    used: int
    limit: int

    @property
    def headroom(self) -> int:
        return self.limit - self.used

    def to_dict(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "hosts": self.hosts,
            "perhostlimit": self.per_host_limit,
            "toleratedfailures": self.tolerated_failures,
            "used": self.used,
            "limit": self.limit,
            "headroom": self.headroom,
        }


def cluster_capacity(cluster: str, hosts: Iterable[HostLoad], tolerated_failures: int = 1) -> ClusterCapacity:
    """Capacity of one cluster. With mixed per-host limits the rule must hold whichever hosts fail, so the
    largest ``tolerated_failures`` hosts are assumed lost."""
    members = [h for h in hosts if h.cluster == cluster]
    limits = sorted((h.max_vms for h in members), reverse=True)
    return ClusterCapacity(
        cluster=cluster,
        hosts=len(members),
        per_host_limit=min(limits) if limits else 0,
        tolerated_failures=tolerated_failures,
        used=sum(h.vms for h in members),
        limit=sum(limits[tolerated_failures:]),
    )


def check_cluster_room(cap: ClusterCapacity, adding: int = 1, *, field: str | None = "hostid") -> None:
    if cap.used + adding > cap.limit:
        raise CapacityError(
            f"cluster {cap.cluster!r} holds {cap.used} VMs; its limit is {cap.limit} "
            f"(({cap.hosts} hosts - {cap.tolerated_failures} tolerated failures) x {cap.per_host_limit} per host) "
            "so that its VMs survive a host failure: add a host or remove VMs",
            field=field,
        )


def choose_host(
    hosts: Iterable[HostLoad],
    *,
    cluster: str | None = None,
    exclude: Iterable[str] = (),
    prefer: str | None = None,
    field: str | None = "hostid",
) -> HostLoad:
    """The host with the most free slots among the up hosts (optionally of one cluster), ties by name."""
    excluded = set(exclude)
    candidates = [
        h
        for h in hosts
        if h.up and h.name not in excluded and h.vms < h.max_vms and (cluster is None or h.cluster == cluster)
    ]
    if not candidates:
        raise CapacityError("no host that is up has room for another VM", field=field)
    if prefer is not None:
        for h in candidates:
            if h.name == prefer:
                return h
    return sorted(candidates, key=lambda h: (h.vms - h.max_vms, h.name))[0]


def check_host_room(host: HostLoad) -> None:
    if not host.up:
        raise CapacityError(f"host {host.name!r} is not up", field="hostid")
    if host.vms >= host.max_vms:
        raise CapacityError(f"host {host.name!r} is full: {host.vms} of {host.max_vms} VMs", field="hostid")


def low_headroom(cap: ClusterCapacity, threshold: int) -> bool:
    return cap.headroom <= threshold


def loads_by_cluster(loads: Iterable[HostLoad]) -> Mapping[str, list[HostLoad]]:
    out: dict[str, list[HostLoad]] = {}
    for h in loads:
        out.setdefault(h.cluster, []).append(h)
    return out


def committed_memory_mib(offering: Mapping[str, Any]) -> int:
    """Memory a running guest of this offering can hold on its host: the maximum for a dynamic offering."""
    memory = int(offering.get("memory_mib") or 0)
    if offering.get("dynamic"):
        return max(memory, int(offering.get("max_memory_mib") or memory))
    return memory
