"""``moldd-audit export``: the log as JSON lines or CSV for a SIEM, one record per event, in position order.

The format is stable: fields are only ever added at the end, never renamed, removed or reordered.

===============  ============================================================================================
field            meaning
===============  ============================================================================================
position         global log position (integer, gap-free, from 1)
recorded_at      when the log recorded the event: ISO 8601 UTC with microseconds, e.g.
                 ``2024-05-01T12:00:00.123456Z``
stream           stream id: ``vm-<name>``, ``host-<name>``, ``group-<name>``, ``daemon``
stream_version   the event's version in its stream (integer, gap-free, from 1)
type             event type, e.g. ``vm.start.requested`` (see moldd/eventtypes.py)
schema_version   schema version of the payload as stored (integer)
actor            who caused it: ``uid=1000(alice) gid=1000 pid=4242`` for a client of the socket, or an
                 internal actor: ``system``, ``ha``, ``libvirt``
command_id       the client's command id, on the event that recorded the command (else null / empty)
causation_id     the command id that caused this event (else null / empty)
correlation_id   the job id (= command id) this event belongs to (else null / empty)
payload          the event's data: a JSON object in JSON lines; in CSV the JSON text exactly as stored and
                 hashed (canonical: sorted keys, no spaces, UTF-8)
hash             this row's chain hash, 64 hex digits
prev_hash        the previous row's chain hash (the genesis hash for position 1), 64 hex digits
===============  ============================================================================================

JSON lines: one JSON object per line with exactly these keys; null for an absent id. Unicode is written as
UTF-8, not escaped.

CSV: RFC 4180 (comma separator, fields with a comma, a quote or a line break in double quotes, a quote doubled,
CRLF line ends), UTF-8, one header row with the field names above. An absent id is an empty field (moldd never
writes an empty id).

Because the payload is exported byte for byte and the hashes with it, an exported range can be re-checked
against the chain (and the hash of its last row against a signed checkpoint) without the database.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from events.envelope import us_to_datetime
from moldd.audit.errors import AuditError
from moldd.audit.log import iso, iter_rows, log_info, open_log

FIELDS = (
    "position",
    "recorded_at",
    "stream",
    "stream_version",
    "type",
    "schema_version",
    "actor",
    "command_id",
    "causation_id",
    "correlation_id",
    "payload",
    "hash",
    "prev_hash",
)
FORMATS = ("jsonl", "csv")


def _position(text: str | int | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        pos = int(text)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"{name} {text!r} is not a whole number", field=name.lstrip("-")) from exc
    if pos < 1:
        raise AuditError(f"{name} {pos}: positions start at 1", field=name.lstrip("-"))
    return pos


def export_records(
    db: str | Path, from_position: int | str | None = None, to_position: int | str | None = None
) -> Iterator[dict[str, Any]]:
    """Records (dicts with FIELDS; payload is the stored JSON text) of positions from..to inclusive."""
    start = _position(from_position, "--from") or 1
    end = _position(to_position, "--to")
    if end is not None and end < start:
        raise AuditError(f"--to {end} is before --from {start}", field="to")
    with open_log(db) as conn:  # checked now, not at the first next(): bad input fails before any output
        log_info(conn, db)
    return _records(db, start, end)


def _records(db: str | Path, start: int, end: int | None) -> Iterator[dict[str, Any]]:
    with open_log(db) as conn:
        for row in iter_rows(conn, start, end):
            pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, prev_h, h = row
            text = payload.decode("utf-8", "surrogateescape") if isinstance(payload, bytes) else str(payload)
            yield {
                "position": pos,
                "recorded_at": iso(us_to_datetime(int(ts))),  # type: ignore[call-overload]
                "stream": sid,
                "stream_version": sv,
                "type": et,
                "schema_version": schv,
                "actor": actor,
                "command_id": cid,
                "causation_id": caus,
                "correlation_id": corr,
                "payload": text,
                "hash": bytes(h).hex(),  # type: ignore[call-overload]
                "prev_hash": bytes(prev_h).hex(),  # type: ignore[call-overload]
            }


def write_jsonl(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for rec in records:
        try:
            rec = rec | {"payload": json.loads(rec["payload"])}
        except ValueError:
            pass  # a damaged payload stays a string: the export shows the evidence as it is
        out.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        n += 1
    return n


def write_csv(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    w = csv.DictWriter(out, fieldnames=FIELDS, dialect="excel", lineterminator="\r\n")
    w.writeheader()
    n = 0
    for rec in records:
        w.writerow({k: ("" if v is None else v) for k, v in rec.items()})
        n += 1
    return n


def export(
    db: str | Path,
    fmt: str,
    out: IO[str],
    from_position: int | str | None = None,
    to_position: int | str | None = None,
) -> int:
    """Write the export to ``out``; returns the number of events written."""
    if fmt not in FORMATS:
        raise AuditError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}", field="format")
    records = export_records(db, from_position, to_position)
    return write_jsonl(records, out) if fmt == "jsonl" else write_csv(records, out)
