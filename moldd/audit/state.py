"""``moldd-audit state``: the whole projected state (VMs, hosts, groups) as it was at a position or a time.

The events are folded by :class:`moldd.projection.readmodel.ReadModel`, the fold the daemon itself runs, so a
replay to position P shows exactly what the daemon showed when its read model stood at P (the ``position`` of
its API replies). Replay does not check the chain: run ``moldd-audit verify`` first.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from moldd.audit.errors import AuditError
from moldd.audit.log import iso, iter_events, log_info, open_log, parse_time, time_to_us
from moldd.projection.readmodel import ReadModel


@dataclass
class StateAt:
    model: ReadModel
    log_id: str
    last_position: int  # of the whole log
    recorded_at: str | None  # time of the newest event folded
    hash: str | None  # chain hash at model.position (hex)

    def view(self) -> dict[str, Any]:
        """``ReadModel.view()`` plus, per host, the counts ``listHosts`` shows, and where in the log this is."""
        v = self.model.view()
        for h in v["hosts"]:
            h |= self.model.host_counts(h["name"])
        v["log_id"] = self.log_id
        v["log_last_position"] = self.last_position
        v["recorded_at"] = self.recorded_at
        v["hash"] = self.hash
        return v


def parse_position(text: str | int) -> int:
    try:
        pos = int(text)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"--at-position {text!r} is not a whole number", field="at_position") from exc
    if pos < 0:
        raise AuditError(
            f"--at-position {pos} is negative; positions start at 1 (0 = empty)", field="at_position"
        )
    return pos


def fold(
    conn: sqlite3.Connection, *, to_position: int | None = None, until: datetime | None = None
) -> tuple[ReadModel, str | None, str | None]:
    """Fold events 1..to_position (or recorded at or before ``until``) into a fresh ReadModel."""
    model = ReadModel()
    last = None
    limit_us = time_to_us(until) if until is not None else None
    apply = model.apply
    for ev in iter_events(conn, 1, to_position):
        if limit_us is not None and time_to_us(ev.recorded_at) > limit_us:
            break  # recorded_at never goes backwards in an intact log (verify checks it)
        apply(ev)  # type: ignore[arg-type]  # fold_into's cast, without a call per event
        last = ev
    if last is None:
        return model, None, None
    return model, iso(last.recorded_at), last.hash.hex()


def state_at(
    db: str | Path, *, at_position: int | str | None = None, at_time: str | datetime | None = None
) -> StateAt:
    """The read model as of ``at_position`` (inclusive) or ``at_time`` (events recorded at or before it)."""
    if at_position is not None and at_time is not None:
        raise AuditError("give --at-position or --at-time, not both", field="at_position")
    pos = parse_position(at_position) if at_position is not None else None
    until = (parse_time(at_time) if isinstance(at_time, str) else at_time) if at_time is not None else None
    with open_log(db) as conn:
        info = log_info(conn, db)
        if pos is not None and pos > info.last_position:
            raise AuditError(
                f"--at-position {pos} is beyond the end of the log (last position {info.last_position})",
                field="at_position",
            )
        model, at, h = fold(conn, to_position=pos, until=until)
    return StateAt(model, info.log_id, info.last_position, at, h)
