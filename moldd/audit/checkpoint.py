"""``moldd-audit keygen`` and ``moldd-audit checkpoint``: the signing key and signed checkpoints of a log.

Both reuse ``events.checkpoint``. The key pair is named for moldd's configuration (``[checkpoints] key =
".../checkpoint.key"``); the public key (``checkpoint.pub``) is what an auditor passes to ``verify
--public-key``. The daemon signs, so its private key is on the database host (mode 0600); keep the public key
and a copy of the checkpoints file off it: whoever holds the key can sign a rewritten log from then on, but not
change what an off-host copy of earlier checkpoints sealed (docs/audit.md, threat model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from events.checkpoint import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    Checkpoint,
    checkpoint_db,
    generate_keys,
    load_private_key,
)
from events.errors import CheckpointError
from events.verify import same_file
from moldd.audit.errors import AuditError
from moldd.audit.verify import AuditVerify, audit_verify

KEY_NAME = "checkpoint"


def keygen(directory: str | Path, name: str = KEY_NAME) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PEM, mode 0600) and ``<name>.pub`` in ``directory``; never overwrites a key."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"cannot create {d}: {exc.strerror}", field="dir") from exc
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    for p in (priv, pub):
        if p.exists():
            raise AuditError(f"{p} already exists; refusing to overwrite a key", field="dir")
    tmp = Path(tempfile.mkdtemp(prefix=".keygen-", dir=d))
    try:
        try:
            gpriv, gpub = generate_keys(tmp)
        except CheckpointError as exc:
            raise AuditError(exc.message, field="dir") from exc
        assert gpriv.name == PRIVATE_KEY_NAME and gpub.name == PUBLIC_KEY_NAME
        try:
            os.link(gpriv, priv)  # link, not rename: fails instead of replacing a key created meanwhile
            os.link(gpub, pub)
        except FileExistsError as exc:
            raise AuditError(
                f"{exc.filename} already exists; refusing to overwrite a key", field="dir"
            ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return priv, pub


def checkpoint(
    db: str | Path, key: str | Path, out: str | Path, *, check: bool = True
) -> tuple[Checkpoint | None, AuditVerify | None]:
    """Verify the log (against ``out``'s earlier checkpoints, if any), then sign its head and append to ``out``.

    Returns (None, the failed verification) when the log does not verify: a tampered log is not sealed."""
    if same_file(out, db):
        raise AuditError(f"--out {out} is the log itself: refusing to write into the evidence", field="out")
    try:
        private = load_private_key(key)
    except CheckpointError as exc:
        raise AuditError(exc.message, field="key") from exc
    if check:
        have = Path(out).exists()
        result = audit_verify(db, out if have else None, private.public_key() if have else None)
        if result.exit_code != 0:
            return None, result
    else:
        result = None
    try:
        cp = checkpoint_db(db, private, out)
    except CheckpointError as exc:
        raise AuditError(exc.message, field="key") from exc
    except OSError as exc:
        raise AuditError(f"cannot append to {out}: {exc.strerror}", field="out") from exc
    return cp, result
