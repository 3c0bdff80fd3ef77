"""Host loads as the capacity rules see them, from the read model and the configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moldd.config import Config
from moldd.domain.capacity import (
    ClusterCapacity,
    HostLoad,
    check_cluster_room,
    check_host_room,
    choose_host,
    cluster_capacity,
)
from moldd.domain.errors import NotFound, ValidationError


def host_loads(
    config: Config, model: Any, *, ignore_vm: str | None = None, reserved: Mapping[str, str] | None = None
) -> list[HostLoad]:
    """``reserved``: VM name → host a migration in flight is taking it to (the slot is spoken for)."""
    loads = []
    heading = list((reserved or {}).items())
    for h in config.hosts:
        state = model.hosts.get(h.name)
        up = state is None or (state.health == "Up" and state.link == "connected")
        count = sum(1 for vm in model.vms_on(h.name) if vm.name != ignore_vm)
        count += sum(1 for vm, dest in heading if dest == h.name and vm != ignore_vm)
        loads.append(HostLoad(name=h.name, cluster=h.cluster, max_vms=h.max_vms, vms=count, up=up))
    return loads


def capacities(config: Config, model: Any) -> list[ClusterCapacity]:
    loads = host_loads(config, model)
    clusters = sorted({h.cluster for h in config.hosts})
    return [cluster_capacity(c, loads, config.tolerated_host_failures) for c in clusters]


def place_new_vm(
    config: Config,
    model: Any,
    requested_host: str | None,
    *,
    reserved: Mapping[str, str] | None = None,
    cluster: str | None = None,
) -> HostLoad:
    """Choose (or check) the host for a new VM (in ``cluster`` when given): the host must be up with a free
    slot, and the cluster must stay within its N-k capacity rule."""
    loads = host_loads(config, model, reserved=reserved)
    if cluster is not None and not any(h.cluster == cluster for h in loads):
        known = ", ".join(sorted({h.cluster for h in loads}))
        raise NotFound(f"no cluster {cluster!r} (known: {known})", field="cluster")
    if requested_host is not None:
        host = next((h for h in loads if h.name == requested_host), None)
        if host is None:
            raise NotFound(f"no host {requested_host!r}", field="hostid")
        if cluster is not None and host.cluster != cluster:
            raise ValidationError(
                f"host {host.name} is in cluster {host.cluster}, not {cluster}", field="hostid"
            )
        check_host_room(host)
    else:
        host = choose_host(loads, cluster=cluster, field=None)  # no host was given: no field is to blame
    check_cluster_room(
        cluster_capacity(host.cluster, loads, config.tolerated_host_failures),
        field="hostid" if requested_host is not None else None,
    )
    return host


def place_returning_vm(
    config: Config, model: Any, vm_name: str, *, current: str | None, cluster: str | None,
    reserved: Mapping[str, str] | None = None,
) -> HostLoad:  # fmt: skip
    """A VM that does not count now (Destroyed) comes back into the count (recover): like a deploy, its host
    needs a free slot (its own host if it has one, else the emptiest up host of its cluster) and the cluster
    must stay within its N-k rule. Refusals name field ``id`` (the VM that would not fit)."""
    loads = host_loads(config, model, ignore_vm=vm_name, reserved=reserved)
    mine = next((h for h in loads if h.name == current), None)
    if mine is not None and mine.up and mine.vms < mine.max_vms:
        host = mine
    else:
        host = choose_host(loads, cluster=cluster, field="id")
    check_cluster_room(cluster_capacity(host.cluster, loads, config.tolerated_host_failures), field="id")
    return host


def place_existing(
    config: Config,
    model: Any,
    vm_name: str,
    *,
    current: str | None,
    exclude: set[str] | None = None,
    cluster: str | None = None,
    reserved: Mapping[str, str] | None = None,
) -> HostLoad:
    """A host to (re)start an existing VM: its own host when that is up, else the emptiest up host of its cluster.
    The VM already counts against its cluster, so only per-host room is checked."""
    loads = host_loads(config, model, ignore_vm=vm_name, reserved=reserved)
    excluded = exclude or set()
    if current is not None and current not in excluded:
        mine = next((h for h in loads if h.name == current), None)
        if mine is not None and mine.up and mine.vms < mine.max_vms:
            return mine
    return choose_host(loads, cluster=cluster, exclude=excluded)
