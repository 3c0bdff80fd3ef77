"""``moldd-audit state``: the whole projected state (VMs, hosts, groups) as it was at a position or a time.

The events are folded by :class:`moldd.projection.readmodel.ReadModel`, the fold the daemon itself runs, so a
replay to position P shows exactly what the daemon showed when its read model stood at P (the ``position`` of
its API replies). Replay does not check the chain: run ``moldd-audit verify`` first.
"""

from __future__ import annotations

import gc
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from events.envelope import us_to_datetime
from moldd.audit.errors import AuditError
from moldd.audit.log import (
    check_schema,
    hash_at,
    iso,
    iter_fold_batches,
    log_info,
    open_log,
    parse_time,
    time_to_us,
)
from moldd.eventtypes import upcasters
from moldd.projection.readmodel import ReadModel, decode_payload


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
    """Fold events 1..to_position (or recorded at or before ``until``) into a fresh ReadModel.

    The rows go to ``ReadModel.apply_rows`` (what folding ``iter_events`` gives, without a datetime per event);
    every row is checked as ``iter_events`` checks it (column types, schema version, JSON payload)."""
    model = ReadModel()
    limit_us = time_to_us(until) if until is not None else None
    up = upcasters()
    current = up.known
    last: tuple[object, ...] | None = None
    collecting = gc.isenabled()
    gc.disable()  # the rows and the model make no cycles; the collector's passes would walk them all
    try:
        for batch, typed in iter_fold_batches(conn, 1, to_position):
            cut = False
            if limit_us is not None:
                # the events up to the first one recorded after ``until`` (recorded_at never goes backwards in
                # an intact log: verify checks it); that one is checked too, as iter_events checks every row
                for i, r in enumerate(batch):
                    if type(r[5]) is not int or r[5] > limit_us:
                        _check_rows(batch[: i + 1], current)
                        batch, cut = batch[:i], True
                        break
            if typed:
                _check_versions(batch, current)
            else:
                _check_rows(batch, current)
            if batch:
                try:
                    model.apply_rows(batch, current, up.upcast)
                except (ValueError, TypeError):
                    _check_payloads(batch)  # the AuditError of a payload that is not JSON, if that was it
                    raise
                last = batch[-1]
            if cut:
                break
    finally:
        if collecting:
            gc.enable()
    if last is None:
        return model, None, None
    at = int(last[5])  # type: ignore[call-overload]
    return model, iso(us_to_datetime(at)), hash_at(conn, int(last[0])).hex()  # type: ignore[call-overload]


def _check_rows(batch: list[tuple[object, ...]], current: Mapping[str, int]) -> None:
    """``iter_events``'s checks of each row, in one pass; the first bad row raises its AuditError."""
    big = 1 << 62
    for r in batch:
        if (
            type(r[0]) is not int
            or type(r[3]) is not str
            or type(r[4]) is not int
            or type(r[5]) is not int
            or r[4] > current.get(r[3], big)
        ):
            pos, et, schv, ts = r[0], r[3], r[4], r[5]
            if not (isinstance(pos, int) and isinstance(et, str) and isinstance(schv, int) and isinstance(ts, int)):
                raise AuditError(f"position {pos!r}: a column of the row has the wrong type; run verify", field="db")
            check_schema(et, schv, pos)


def _check_versions(batch: list[tuple[object, ...]], current: Mapping[str, int]) -> None:
    """``_check_rows`` of rows whose column types are known to be right: the schema versions only."""
    big = 1 << 62
    get = current.get
    for r in batch:
        if r[4] > get(r[3], big):  # type: ignore[call-overload]
            check_schema(r[3], r[4], r[0])  # type: ignore[arg-type]


def _check_payloads(batch: list[tuple[object, ...]]) -> None:
    for r in batch:
        try:
            decode_payload(r[8])  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise AuditError(f"position {r[0]}: the payload is not JSON ({exc}); run verify", field="db") from exc


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
