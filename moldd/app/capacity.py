"""The capacity warning: a `cluster.capacity_low` event when a deploy takes a cluster's headroom down to the
configured threshold (once per crossing, not on every deploy)."""

from __future__ import annotations

import structlog

from events import ANY_VERSION, NewEvent
from moldd.app.placement import capacities
from moldd.app.service import App, Command
from moldd.domain.capacity import low_headroom

log = structlog.get_logger("moldd.capacity")


async def async_note_capacity(app: App, cluster: str, cmd: Command | None, vm: str | None) -> None:
    """After a deploy: warn once when the cluster's headroom crosses down to the warning level. A deploy adds
    exactly one VM to the cluster, so it crossed iff the headroom is now exactly at the threshold."""
    threshold = app.config.capacity_warning_headroom
    cap = next((c for c in capacities(app.config, app.model) if c.cluster == cluster), None)
    if cap is None or not low_headroom(cap, threshold) or cap.headroom != threshold:
        return
    payload = {**cap.to_dict(), "threshold": threshold, "vm": vm,
               "message": f"cluster {cluster!r} has {cap.headroom} VM slot(s) left under its N-"
                          f"{cap.tolerated_failures} rule ({cap.used}/{cap.limit}): add a host or rebalance"}  # fmt: skip
    await app.async_append(
        f"cluster-{cluster}",
        [NewEvent("cluster.capacity_low", payload, actor="system", causation_id=cmd.id if cmd else None)],
        expected_version=ANY_VERSION,
    )
    log.warning(
        "cluster_capacity_low", cluster=cluster, used=cap.used, limit=cap.limit, headroom=cap.headroom
    )
