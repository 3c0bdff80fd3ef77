"""What the daemon checks before it trusts or seals its log, and the modes of the files it keeps.

- At start, before the read model is built, the rows the daemon is about to fold are recomputed from a point it
  can vouch for: the newest signed checkpoint of its checkpoints file (its hash must still be the log's hash
  there) or the position of a snapshot sealed in the chain, whichever is older, else the genesis hash. So
  start-up costs the tail, not the whole log. A mismatch refuses the start (:class:`LogIntegrityError`, exit
  code :data:`EXIT_LOG_TAMPERED`) rather than serving, and sealing, a rewritten history.
- Before every checkpoint signature, the rows written since the last verified position are recomputed again, and
  the head must be the hash the daemon's own writer computed: a row changed under the running daemon is never
  signed.
- Files: the database (and so its -wal/-shm) is created 0600, the checkpoints file 0640, whatever the umask;
  "other" permission bits are taken away from existing ones; a signing key any other user can read (or a group
  can write) refuses the start.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from events import LogIntegrityError
from events.chain import genesis_hash
from events.checkpoint import Checkpoint, load_private_key, parse_checkpoints
from events.verify import verify_chain_range

log = structlog.get_logger("moldd.integrity")

EXIT_LOG_TAMPERED = 3
"""moldd's exit code when its log does not verify at start."""


class KeyFileError(Exception):
    """The checkpoint signing key file is readable by others (or writable by its group)."""


def check_key_file(path: Path) -> None:
    """Refuse a signing key that other users can read or that a group can write."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"cannot read the checkpoint key {path}: {exc.strerror}") from exc
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o027:
        raise KeyFileError(
            f"the checkpoint key {path} has mode {mode:04o}: other users can read it or its group can write "
            f"it (anyone who can read it can sign a rewritten log); run: chmod 0600 {path}"
        )


def tighten(path: Path) -> None:
    """Remove the "other" permission bits (and group write) of an existing file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o027:
        os.chmod(path, mode & 0o750)
        log.warning("file_mode_tightened", path=str(path), was=f"{mode:04o}", now=f"{mode & 0o750:04o}")


def prepare_database_dir(database: Path) -> None:
    """Create the database's directory 0750 if missing; tighten an existing database and its -wal/-shm."""
    parent = database.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o750, exist_ok=True)
        os.chmod(parent, 0o750)
    for suffix in ("", "-wal", "-shm"):
        tighten(Path(str(database) + suffix))


@dataclass
class Verified:
    position: int
    hash: bytes


def _ro_connect(database: Path) -> sqlite3.Connection:
    # the daemon's own live file: a plain read-only connection (its -shm already exists)
    return sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True)


def newest_checkpoint(key_path: Path | None, file: Path | None, log_id: str) -> Checkpoint | None:
    """The newest validly signed checkpoint of this log in the daemon's checkpoints file (None if none)."""
    if key_path is None or file is None or not file.exists():
        return None
    public = load_private_key(key_path).public_key()
    good, bad = parse_checkpoints(file, public)
    for lineno, why in bad:
        log.warning("checkpoint_line_invalid", file=str(file), line=lineno, reason=why)
    own = [c for c in good if c.log_id == log_id]
    return max(own, key=lambda c: (c.position, c.seq)) if own else None


def _stored_hash(conn: sqlite3.Connection, log_id: str, position: int) -> bytes | None:
    if position == 0:
        return genesis_hash(log_id)
    row = conn.execute("SELECT hash FROM events WHERE position = ?", (position,)).fetchone()
    return bytes(row[0]) if row else None


def _check_checkpoint(checkpoint: Checkpoint, head_position: int, have: bytes | None) -> None:
    """Raises LogIntegrityError if the log ends before the checkpoint's position or `have` (the stored hash at
    that position, None for no row) is not the hash the checkpoint sealed."""
    if checkpoint.position > head_position:
        raise LogIntegrityError(
            f"the log ends at position {head_position} but the checkpoint of {checkpoint.time} sealed position "
            f"{checkpoint.position}: the log was cut short",
            position=head_position + 1,
            kind="truncated",
        )
    if have is None or have.hex() != checkpoint.head_hash:
        raise LogIntegrityError(
            f"position {checkpoint.position}: the hash differs from the checkpoint of {checkpoint.time}: "
            "the log was rewritten at or before this position",
            position=checkpoint.position,
            kind="rewritten",
        )


def verify_at_start(
    database: Path, log_id: str, head: tuple[int, bytes], snapshot_position: int, checkpoint: Checkpoint | None
) -> Verified:
    """Blocking (run in a thread). Raises LogIntegrityError."""
    conn = _ro_connect(database)
    try:
        if checkpoint is not None:
            cut = checkpoint.position > head[0]
            _check_checkpoint(checkpoint, head[0], None if cut else _stored_hash(conn, log_id, checkpoint.position))
        start = snapshot_position if checkpoint is None else min(snapshot_position, checkpoint.position)
        anchor = _stored_hash(conn, log_id, start)
        if anchor is None:
            raise LogIntegrityError(f"position {start}: no row", position=start, kind="truncated")
        position, last = verify_chain_range(conn, start, anchor)
    finally:
        conn.close()
    if (position, last) != head:
        raise LogIntegrityError(
            f"the log's head (position {position}) is not the head the store opened (position {head[0]})",
            position=min(position, head[0]) + 1,
            kind="head_mismatch",
        )
    return Verified(position, last)


def verify_before_signing(database: Path, verified: Verified, head: tuple[int, bytes]) -> Verified:
    """Blocking (run in a thread). The rows after `verified` up to the writer's head, recomputed; the result
    must be the head the writer computed. Raises LogIntegrityError."""
    conn = _ro_connect(database)
    try:
        stored = _stored_hash_or_none(conn, verified.position)
        if verified.position > 0 and stored != verified.hash:
            raise LogIntegrityError(
                f"position {verified.position}: the hash changed since it was verified",
                position=verified.position,
                kind="rewritten",
            )
        position, last = verify_chain_range(conn, verified.position, verified.hash, head[0])
    finally:
        conn.close()
    if last != head[1]:
        raise LogIntegrityError(
            f"position {position}: the stored hash is not the one the daemon's writer computed",
            position=position,
            kind="head_mismatch",
        )
    return Verified(position, last)


def _stored_hash_or_none(conn: sqlite3.Connection, position: int) -> bytes | None:
    row = conn.execute("SELECT hash FROM events WHERE position = ?", (position,)).fetchone()
    return bytes(row[0]) if row else None


def _is_postgres(store: Any) -> bool:
    return hasattr(store, "async_verify_range")  # events.postgres.PostgresEventStore: the log is not a file


async def async_verify_at_start(store: Any, database: Path, snapshot_position: int, config: Any) -> Verified:
    """The start-up check (see the module doc), off the event loop. On a PostgreSQL log (several nodes may
    share it) the rows are read a page at a time and hashed on a thread, up to the head stored once the
    checkpoint was read (a checkpoint another node signed meanwhile is never taken for a truncation)."""
    cps = config.checkpoints
    checkpoint = await asyncio.to_thread(newest_checkpoint, cps.key, cps.file, store.log_id)
    if _is_postgres(store):
        head = await store.async_stored_head()
        verified = await _async_verify_store_at_start(store, head, snapshot_position, checkpoint)
    else:
        head = await store.async_head()
        verified = await asyncio.to_thread(
            verify_at_start, database, store.log_id, head, snapshot_position, checkpoint
        )
    log.info(
        "log_verified",
        from_position=snapshot_position if checkpoint is None else min(snapshot_position, checkpoint.position),
        to_position=verified.position,
        checkpoint=None if checkpoint is None else checkpoint.position,
    )
    return verified


async def _async_verify_store_at_start(
    store: Any, head: tuple[int, bytes], snapshot_position: int, checkpoint: Checkpoint | None
) -> Verified:
    """verify_at_start for a store that is not a file (async_hash_at, async_verify_range)."""
    if checkpoint is not None:
        cut = checkpoint.position > head[0]
        _check_checkpoint(checkpoint, head[0], None if cut else await store.async_hash_at(checkpoint.position))
    start = snapshot_position if checkpoint is None else min(snapshot_position, checkpoint.position)
    anchor = await store.async_hash_at(start)
    if anchor is None:
        raise LogIntegrityError(f"position {start}: no row", position=start, kind="truncated")
    position, last = await store.async_verify_range(start, anchor, head[0])
    if (position, last) != head:
        raise LogIntegrityError(
            f"position {position}: the chain recomputed from position {start} does not end at the stored head",
            position=position,
            kind="head_mismatch",
        )
    return Verified(position, last)


async def async_verify_before_signing(
    store: Any, database: Path, verified: Verified
) -> tuple[Verified, tuple[int, bytes]]:
    """The check before a signature, off the event loop: (verified up to the head to sign, that head).

    On a file: the rows since `verified` are recomputed and must end at the hash the writer computed. On
    PostgreSQL likewise; a leader whose writer has not written since it took over (its head may be older than
    the rows its predecessor wrote) signs the stored head once the rows up to it are recomputed."""
    if not _is_postgres(store):
        head = await store.async_head()
        return await asyncio.to_thread(verify_before_signing, database, verified, head), head
    head = await store.async_head() if store.head_is_current else await store.async_stored_head()
    if head[0] < verified.position:
        head = await store.async_stored_head()
    stored = await store.async_hash_at(verified.position)
    if verified.position > 0 and stored != verified.hash:
        raise LogIntegrityError(
            f"position {verified.position}: the hash changed since it was verified",
            position=verified.position,
            kind="rewritten",
        )
    position, last = await store.async_verify_range(verified.position, verified.hash, head[0])
    if last != head[1]:
        raise LogIntegrityError(
            f"position {position}: the stored hash is not the one the daemon's writer computed",
            position=position,
            kind="head_mismatch",
        )
    return Verified(position, last), head
