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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from events import VerifyReport, verify
from events.checkpoint import load_public_key
from events.errors import CheckpointError
from moldd.audit.errors import EXIT_ERROR
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
    future = [w for w in report.warnings if w.kind == "schema_version_from_future"]
    if future and report.status == "intact":
        w = future[0]
        result.status = "error"
        result.error = f"position {w.position}: {w.message} (a log written by a newer moldd: use that version's moldd-audit)"
    return result
