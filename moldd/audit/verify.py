"""``moldd-audit verify``: the log's integrity, checked by ``events.verify`` against moldd's event registry.

What is checked (all by ``events.verify``, read-only): the hash chain from the genesis hash, gaps in positions,
per-stream version gaps, time going backwards, the signature of every checkpoint, truncation (a checkpoint
seals a position the log no longer has) and rewriting (the hash at a checkpointed position differs), and
unknown event types / schema versions against :data:`moldd.eventtypes.EVENT_TYPES`.

Outcome: ``intact`` (exit 0), ``tampered`` (exit 1, with the first bad position and the reason), ``error``
(exit 2: the file, the key or the checkpoints cannot be read, or the log holds schema versions from a newer
moldd, so this moldd cannot vouch for what they mean). Unknown event types are warnings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from events import EventLogError, VerifyReport, verify
from events.checkpoint import load_public_key
from events.errors import CheckpointError
from moldd.audit.errors import EXIT_ERROR, AuditError
from moldd.eventtypes import EVENT_TYPES


@dataclass
class AuditVerify:
    report: VerifyReport
    status: str
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"intact": 0, "tampered": 1}.get(self.status, EXIT_ERROR)

    def to_dict(self) -> dict[str, Any]:
        d = self.report.to_dict()
        d["status"] = self.status
        d["exit_code"] = self.exit_code
        d["error"] = self.error if self.error is not None else d.get("error")
        d["notes"] = list(self.notes)
        return d

    def render(self) -> str:
        text = self.report.render()
        if self.status == "error" and self.report.status != "error":
            lines = text.splitlines()
            lines = [ln for ln in lines if not ln.startswith("RESULT:")]
            lines.append(f"could not check: {self.error}")
            lines.append("RESULT: ERROR (exit 2)")
            text = "\n".join(lines)
        if self.notes:
            text += "\n" + "\n".join(f"note: {n}" for n in self.notes)
        return text


def check_sealed_snapshots(db: str | Path, report: VerifyReport) -> int:
    """Fold the log with the daemon's read model and check every ``snapshot.sealed`` event of its snapshot:
    the state at the sealed position must have the sealed digest. A seal appended to the chain by someone who
    can write the file (to make a daemon trust a forged snapshot) is caught here. Returns how many were checked."""
    from events.canonical import canonical_json
    from events.snapshot import SEAL_TYPE, seal_stream, state_digest
    from events.verify import Issue
    from moldd.app.projector import SNAPSHOT_NAME
    from moldd.audit.log import fold_into, iter_events, open_log
    from moldd.projection.readmodel import ReadModel

    with open_log(db) as conn:
        seals: dict[int, list[tuple[int, str]]] = {}
        for pos, payload in conn.execute(
            "SELECT position, payload FROM events WHERE stream_id = ? AND event_type = ? ORDER BY position",
            (seal_stream(SNAPSHOT_NAME), SEAL_TYPE),
        ):
            try:
                p = json.loads(payload)
                seals.setdefault(int(p["position"]), []).append((int(pos), str(p["digest"])))
            except (ValueError, KeyError, TypeError):
                report.issues.append(Issue(pos, "seal_malformed", "a snapshot.sealed event is not a seal"))
        if not seals:
            return 0
        model = ReadModel()
        todo = sorted(seals)
        checked = 0

        def check(at: int) -> None:
            nonlocal checked
            digest = state_digest(canonical_json(model.to_dict()))
            for seal_pos, sealed in seals[at]:
                checked += 1
                if sealed != digest:
                    report.issues.append(
                        Issue(
                            seal_pos,
                            "seal_forged",
                            f"the snapshot.sealed event at position {seal_pos} seals a state at position {at} "
                            "that a fold of the log does not produce (a forged seal: a daemon would trust a "
                            "forged snapshot)",
                        )
                    )

        for ev in iter_events(conn, 1, todo[-1]):
            while todo and todo[0] < ev.position:
                check(todo.pop(0))
            fold_into(model, ev)
        while todo:
            check(todo.pop(0))
    if any(i.kind in ("seal_forged", "seal_malformed") for i in report.issues) and report.status == "intact":
        report.status = "tampered"
        first = min((i for i in report.issues if i.position is not None), key=lambda i: i.position or 0)
        report.first_bad_position, report.reason = first.position, f"{first.kind}: {first.message}"
    return checked


def audit_verify(
    db: str | Path,
    checkpoints: str | Path | None = None,
    public_key: str | Path | Ed25519PublicKey | None = None,
) -> AuditVerify:
    """Verify the log at ``db``; never raises for bad input (status "error")."""
    if public_key is not None and checkpoints is None:
        rep = VerifyReport(path=str(db), status="error", error="--public-key needs --checkpoints FILE")
        return AuditVerify(rep, "error", rep.error)
    if checkpoints is not None and public_key is None:
        rep = VerifyReport(path=str(db), status="error", error="--checkpoints needs --public-key KEY")
        return AuditVerify(rep, "error", rep.error)
    if isinstance(public_key, Ed25519PublicKey):
        pk: Any = public_key
    elif public_key is not None:
        try:
            pk = load_public_key(public_key)
        except CheckpointError as exc:
            rep = VerifyReport(path=str(db), status="error", error=exc.message)
            return AuditVerify(rep, "error", exc.message)
    else:
        pk = None
    report = verify(db, known=dict(EVENT_TYPES), checkpoints=checkpoints, public_key=pk)
    result = AuditVerify(report, report.status, report.error)
    if report.status == "error":
        return result
    if checkpoints is None:
        result.notes.append(
            "no checkpoints given: a log cut short or rewritten end to end cannot be detected without them "
            "(--checkpoints FILE --public-key KEY)"
        )
    if report.status != "error":
        try:
            check_sealed_snapshots(db, report)
        except (AuditError, EventLogError) as exc:
            result.notes.append(f"sealed snapshots not checked: {exc}")
        result.status = report.status
    future = [w for w in report.warnings if w.kind == "schema_version_from_future"]
    if future and report.status == "intact":
        w = future[0]
        result.status = "error"
        result.error = f"position {w.position}: {w.message} (a log written by a newer moldd: use that version's moldd-audit)"
    return result
