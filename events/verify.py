"""Verify a log file: chain, gaps, stream versions, time, types, and the signed checkpoints.

Uses plain sqlite3, read-only, so it is fast and works on a copy of the file whatever its triggers.
Integrity problems are `issues` (status "tampered", exit 1); unknown event types, versions from the
future and the unsealed tail are `warnings`. Anything that prevents checking gives status "error" (exit 2).
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import HEADER, TAG, genesis_hash
from .checkpoint import Checkpoint, load_public_key, parse_checkpoints
from .errors import CheckpointError, NotALogError
from .upcast import KnownTypes, known_versions

MAX_ISSUES = 1000
FETCH = 20_000
COLUMNS = (
    "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash"
)


@dataclass(slots=True)
class Issue:
    position: int | None
    kind: str
    message: str


@dataclass(slots=True)
class VerifyReport:
    path: str
    status: str = "intact"  # intact | tampered | error
    log_id: str | None = None
    first_position: int | None = None
    last_position: int = 0
    events_checked: int = 0
    streams: int = 0
    head_hash: str | None = None
    first_bad_position: int | None = None
    reason: str | None = None
    issues: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    checkpoints_checked: int = 0
    checkpoints_valid: int = 0
    newest_checkpoint_position: int | None = None
    newest_checkpoint_time: str | None = None
    unsealed_tail: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "intact"

    @property
    def exit_code(self) -> int:
        return {"intact": 0, "tampered": 1}.get(self.status, 2)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d

    def render(self) -> str:
        lines = [f"log: {self.path}"]
        if self.status == "error":
            lines.append(f"could not check: {self.error}")
            lines.append("RESULT: ERROR (exit 2)")
            return "\n".join(lines)
        lines.append(f"log id: {self.log_id}")
        if self.events_checked:
            lines.append(
                f"checked positions {self.first_position}..{self.last_position} "
                f"({self.events_checked} events, {self.streams} streams)"
            )
        else:
            lines.append("checked: the log is empty")
        if self.checkpoints_checked:
            lines.append(
                f"checkpoints: {self.checkpoints_valid}/{self.checkpoints_checked} valid; newest seals position "
                f"{self.newest_checkpoint_position} at {self.newest_checkpoint_time}"
            )
        if self.unsealed_tail is not None:
            if self.unsealed_tail > 0:
                lines.append(
                    f"unsealed tail: {self.unsealed_tail} events (positions "
                    f"{self.last_position - self.unsealed_tail + 1}..{self.last_position}) not covered by a checkpoint"
                )
            else:
                lines.append("unsealed tail: none")
        for w in self.warnings[:20]:
            lines.append(f"warning at position {w.position}: {w.kind}: {w.message}")
        if self.issues:
            lines.append(f"FIRST BAD POSITION: {self.first_bad_position} ({self.reason})")
            for i in self.issues[:20]:
                lines.append(f"  position {i.position}: {i.kind}: {i.message}")
            if len(self.issues) > 20:
                lines.append(f"  ... {len(self.issues) - 20} more")
            lines.append("RESULT: TAMPERED OR DAMAGED (exit 1)")
        else:
            lines.append("RESULT: INTACT (exit 0)")
        return "\n".join(lines)


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a log read-only (never creates a file). Raises NotALogError."""
    p = Path(path)
    if not p.is_file():
        raise NotALogError(f"{p} does not exist or is not a file")
    uri = p.resolve().as_uri()
    try:
        conn = sqlite3.connect(uri + "?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if Path(str(p) + "-wal").exists():
            raise NotALogError(f"cannot open {p} read-only: {exc}") from exc
        try:  # a WAL database without its -shm may refuse a plain read-only open; no WAL => immutable is safe
            conn = sqlite3.connect(uri + "?immutable=1", uri=True)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc2:
            raise NotALogError(f"{p} is not an SQLite database: {exc2}") from exc2
    return conn


def read_log_id(conn: sqlite3.Connection) -> str:
    from .sqlite import read_log_id as _read

    return _read(conn)


def read_head(conn: sqlite3.Connection) -> tuple[str, int, bytes]:
    """(log id, last position or 0, head hash) of an open log."""
    log_id = read_log_id(conn)
    try:
        row = conn.execute("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise NotALogError(f"not an event log: {exc}") from exc
    if row is None:
        return log_id, 0, genesis_hash(log_id)
    return log_id, int(row[0]), bytes(row[1])


def _surrogate_text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class _Scan:
    """State of one pass over the rows (kept between batches and restarts)."""

    def __init__(self, log_id: str, known: dict[str, int] | None, wanted: set[int]) -> None:
        self.expected = 1
        self.prev = genesis_hash(log_id)
        self.last_ts = -(2**63)
        self.versions: dict[str, int] = {}
        self.known = known
        self.wanted = wanted
        self.hashes: dict[int, bytes] = {}
        self.issues: list[Issue] = []
        self.warnings: list[Issue] = []
        self.count = 0
        self.first: int | None = None
        self.last = 0

    def issue(self, position: int | None, kind: str, message: str) -> None:
        if len(self.issues) < MAX_ISSUES:
            self.issues.append(Issue(position, kind, message))

    def warn(self, position: int | None, kind: str, message: str) -> None:
        if len(self.warnings) < MAX_ISSUES:
            self.warnings.append(Issue(position, kind, message))


def _scan_out_of_range(conn: sqlite3.Connection, st: _Scan) -> None:
    """Rows at positions before 1 are outside the chain (the scan starts at 1) but the store still serves them
    by stream and by time: each one is an inserted row."""
    for (pos,) in conn.execute(
        "SELECT position FROM events WHERE position < 1 ORDER BY position LIMIT ?", (MAX_ISSUES,)
    ):
        st.issue(pos, "position_out_of_range", f"a row at position {pos}: positions start at 1 (inserted row)")


def _scan_rows(conn: sqlite3.Connection, st: _Scan, on_row: Callable[[tuple[Any, ...]], None] | None) -> None:
    """Check every row from st.expected on. The hot loop keeps its state in locals and hashes the columns as
    read (text as its stored UTF-8 bytes, payload as is): see events.chain for the hashed layout."""
    sha256 = hashlib.sha256
    join = b"".join
    pack = HEADER.pack
    tag = TAG
    wanted = st.wanted
    hashes = st.hashes
    versions = st.versions
    versions_get = versions.get
    known = st.known
    malformed = (TypeError, ValueError, struct.error, OverflowError, UnicodeError, AttributeError)
    while True:
        expected = st.expected
        prev: Any = st.prev
        last_ts = st.last_ts
        count = st.count
        pos: Any = None
        cur = conn.execute(f"SELECT {COLUMNS} FROM events WHERE position >= ? ORDER BY position", (expected,))
        cur.arraysize = FETCH
        try:
            for row in cur:
                try:
                    pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, prev_h, h = row
                    if pos != expected:
                        st.issue(expected, "position_gap", f"expected position {expected}, found {pos}")
                    if prev_h != prev:
                        st.issue(pos, "broken_link", "prev_hash does not match the hash of the previous row")
                    try:
                        s = sid.encode()
                        e = et.encode()
                        a = actor.encode()
                        c = b"" if cid is None else cid.encode()
                        ca = b"" if caus is None else caus.encode()
                        co = b"" if corr is None else corr.encode()
                    except UnicodeEncodeError:  # text read back byte-exact (not UTF-8 on disk): hash those bytes
                        s = sid.encode("utf-8", "surrogateescape")
                        e = et.encode("utf-8", "surrogateescape")
                        a = actor.encode("utf-8", "surrogateescape")
                        c = b"" if cid is None else cid.encode("utf-8", "surrogateescape")
                        ca = b"" if caus is None else caus.encode("utf-8", "surrogateescape")
                        co = b"" if corr is None else corr.encode("utf-8", "surrogateescape")
                    header = pack(
                        pos,
                        sv,
                        ts,
                        schv,
                        len(s),
                        len(e),
                        len(a),
                        -1 if cid is None else len(c),
                        -1 if caus is None else len(ca),
                        -1 if corr is None else len(co),
                    )
                    if sha256(join((tag, prev_h, header, s, e, a, c, ca, co, payload))).digest() != h:
                        st.issue(pos, "hash_mismatch", "the row's content does not match its hash")
                    last_v = versions_get(sid, 0)
                    if sv != last_v + 1:
                        st.issue(pos, "stream_version_gap", f"stream {sid!r} goes from version {last_v} to {sv}")
                    versions[sid] = sv
                    if ts < last_ts:
                        st.issue(pos, "time_backwards", "recorded_at is earlier than the previous event's")
                    last_ts = ts
                    if known is not None:
                        cv = known.get(et)
                        if cv is None:
                            st.warn(pos, "unknown_event_type", f"event type {et!r} is not declared")
                        elif schv > cv:
                            st.warn(
                                pos,
                                "schema_version_from_future",
                                f"{et!r} has schema version {schv}, this code knows up to {cv}",
                            )
                    if pos in wanted:
                        hashes[pos] = h
                    if on_row is not None:
                        on_row(row)
                    prev = h
                except malformed as exc:
                    pos = row[0] if isinstance(row[0], int) else expected
                    st.issue(pos, "malformed_row", f"a column has an impossible value: {exc}")
                    prev = row[12] if isinstance(row[12], bytes) else b""
                expected = pos + 1
                count += 1
                if st.first is None:
                    st.first = pos
            return
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc) or conn.text_factory is _surrogate_text:
                raise
            # a TEXT column holds bytes that are not UTF-8 (never written by the library): read on, byte-exact
            conn.text_factory = _surrogate_text
        finally:
            st.expected = expected
            st.prev = prev
            st.last_ts = last_ts
            st.count = count
            if count:
                st.last = expected - 1


def verify(
    path: str | Path,
    known: KnownTypes | None = None,
    checkpoints: str | Path | None = None,
    public_key: Ed25519PublicKey | str | Path | None = None,
    *,
    on_row: Callable[[tuple[Any, ...]], None] | None = None,
) -> VerifyReport:
    """Check the log at `path`. Never raises for a bad log or bad inputs: see report.status/exit_code.

    on_row, if given, is called with each stored row tuple (columns in storage order) as it is checked.
    """
    report = VerifyReport(path=str(path))
    try:
        cps: list[Checkpoint] = []
        bad_cps: list[tuple[int, str]] = []
        if checkpoints is not None:
            if public_key is None:
                raise CheckpointError("checking checkpoints needs the public key (--public-key)")
            pk = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
            cps, bad_cps = parse_checkpoints(checkpoints, pk)
            report.checkpoints_checked = len(cps) + len(bad_cps)
        conn = open_readonly(path)
        try:
            log_id = read_log_id(conn)
            report.log_id = log_id
            own = [c for c in cps if c.log_id == log_id]
            st = _Scan(
                log_id,
                dict(known_versions(known) or {}) if known is not None else None,
                {c.position for c in own},
            )
            try:
                _scan_out_of_range(conn, st)
                _scan_rows(conn, st, on_row)
            except sqlite3.DatabaseError as exc:
                if st.count == 0 and "no such table" in str(exc):
                    raise NotALogError(f"not an event log: {exc}") from exc
                st.issue(st.expected, "unreadable", f"the database cannot be read past here: {exc}")
        finally:
            conn.close()
    except (NotALogError, CheckpointError, OSError, sqlite3.Error) as exc:
        report.status = "error"
        report.error = str(exc)
        return report

    report.first_position = st.first
    report.last_position = st.last
    report.events_checked = st.count
    report.streams = len(st.versions)
    report.head_hash = st.prev.hex() if isinstance(st.prev, bytes) else None
    report.warnings = st.warnings
    for lineno, why in bad_cps:
        st.issue(None, "checkpoint_invalid", f"checkpoint line {lineno}: {why}")
    for c in cps:
        if c.log_id != log_id:
            st.issue(
                None, "checkpoint_other_log", f"a checkpoint is for log {c.log_id}, this log is {log_id}"
            )
    if own:
        report.checkpoints_valid = len(own)
        newest = max(own, key=lambda c: (c.position, c.time))
        report.newest_checkpoint_position = newest.position
        report.newest_checkpoint_time = newest.time
        for c in sorted(own, key=lambda c: c.position):
            if c.position > st.last:
                st.issue(
                    st.last + 1,
                    "truncated",
                    f"the log ends at position {st.last} but a checkpoint of {c.time} sealed position {c.position}",
                )
                break
            have = genesis_hash(log_id) if c.position == 0 else st.hashes.get(c.position)
            if have is None or have.hex() != c.head_hash:
                st.issue(
                    c.position,
                    "rewritten",
                    f"the hash at position {c.position} differs from the checkpoint of {c.time}: "
                    "the log was rewritten at or before this position",
                )
                break
        report.unsealed_tail = max(0, st.last - newest.position)
        if report.unsealed_tail:
            st.warn(
                newest.position + 1,
                "unsealed_tail",
                f"{report.unsealed_tail} events after the newest checkpoint",
            )
    report.issues = st.issues
    if st.issues:
        report.status = "tampered"
        located = [i for i in st.issues if i.position is not None]
        first = min(located, key=lambda i: i.position or 0) if located else st.issues[0]
        report.first_bad_position = first.position
        report.reason = f"{first.kind}: {first.message}"
    return report
