"""Verify a log file: chain, gaps, stream versions, time, types, and the signed checkpoints.

Uses plain sqlite3, read-only, so it is fast and works on a copy of the file whatever its triggers.
Integrity problems are `issues` (status "tampered", exit 1); unknown event types, versions from the
future and the unsealed tail are `warnings`. Anything that prevents checking gives status "error" (exit 2).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (cryptography is imported with a key, not with the module: events.checkpoint)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import loads
from .chain import HEADER, TAG, ChainCheck, genesis_hash
from .checkpoint import Checkpoint, load_public_key, parse_checkpoints
from .errors import CheckpointError, LogIntegrityError, NotALogError
from .upcast import KnownTypes, known_versions

_accelerator: Any
try:  # the optional C scan (events/_chainscan.c, built by setup.py); see _fast_scan
    from . import _chainscan as _accelerator
except ImportError:  # pragma: no cover - not built: the pure-Python scan does everything
    _accelerator = None

ACCELERATOR: Any = None if os.environ.get("EVENTS_VERIFY_PURE_PYTHON") else _accelerator
"""The C scan used to prove a log clean quickly, or None (not built, or EVENTS_VERIFY_PURE_PYTHON=1 set):
reports are identical either way, as the C scan never reports; it only vouches for rows it found clean."""
MAX_ISSUES = 1000
_NO_END = 2**62
SPLIT_AT = 200_000
"""A log of at least this many rows is scanned by the C scan as two halves at once on a machine with two or more
CPUs (see _split_scan)."""
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
    newest_checkpoint_seq: int | None = None
    newest_checkpoint_position: int | None = None
    newest_checkpoint_time: str | None = None
    unsealed_tail: int | None = None
    types_checked: bool = False
    schema_version: int | None = None
    wal_frames: int = 0
    wal_invalid_frames: int = 0
    snapshots_checked: int = 0
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
                f"checkpoints: {self.checkpoints_checked} checked, {self.checkpoints_valid} valid for this log; "
                + (
                    f"newest (#{self.newest_checkpoint_seq or '-'}) seals position "
                    f"{self.newest_checkpoint_position} at {self.newest_checkpoint_time}"
                    if self.newest_checkpoint_position is not None
                    else "none seals this log"
                )
            )
        else:
            lines.append(
                "checkpoints: none checked (a log cut short or rewritten end to end is only detected against "
                "signed checkpoints kept off the host)"
            )
        if not self.types_checked:
            lines.append(
                "event types and schema versions: NOT checked (no registry given; the application's verify "
                "checks them, e.g. moldd-audit verify)"
            )
        if self.wal_frames:
            lines.append(
                f"write-ahead log: {self.wal_frames} frames, {self.wal_frames - self.wal_invalid_frames} valid"
            )
        if self.snapshots_checked:
            lines.append(f"snapshots: {self.snapshots_checked} checked against their seals in the log")
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


class ReadOnlyLog(sqlite3.Connection):
    """A read-only connection to a log (or to a private copy of it), with what was learnt while opening:
    `wal_frames` (frames in the -wal file of the current generation), `wal_valid_frames` (those SQLite uses),
    `wal_lost_commits` (commit frames SQLite discarded as invalid: committed data it will not show)."""

    copy_dir: str | None = None
    # how to open the same bytes again, read-only (the C scan opens its own connection)
    uri: str | None = None
    wal_frames: int = 0
    wal_valid_frames: int = 0
    wal_lost_commits: int = 0
    schema_version: int = 0

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.copy_dir is not None:
                shutil.rmtree(self.copy_dir, ignore_errors=True)
                self.copy_dir = None


WAL_MAGIC = (0x377F0682, 0x377F0683)
_WAL_HEADER = struct.Struct(">IIIIIIII")
_FRAME_HEADER = struct.Struct(">IIIIII")


def wal_frames(wal: Path) -> tuple[int, list[int]]:
    """(page size, [commit size of each frame of the current generation]) read from the -wal file's headers
    (0 = not a commit frame). Frames are counted up to the first one whose salts are not the header's (an
    older generation, left behind when the WAL was restarted); their checksums are not checked here."""
    commits: list[int] = []
    with open(wal, "rb") as f:
        head = f.read(_WAL_HEADER.size)
        if len(head) < _WAL_HEADER.size:
            return 0, commits
        magic, _version, page_size, _seq, salt1, salt2, _c1, _c2 = _WAL_HEADER.unpack(head)
        if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
            return 0, commits
        while True:
            fh = f.read(_FRAME_HEADER.size)
            if len(fh) < _FRAME_HEADER.size:
                break
            _pgno, commit, s1, s2, _f1, _f2 = _FRAME_HEADER.unpack(fh)
            if (s1, s2) != (salt1, salt2):
                break
            if len(f.read(page_size)) < page_size:
                break  # a torn last frame
            commits.append(commit)
    return page_size, commits


def _sqlite_uri(p: Path, query: str) -> str:
    return p.resolve().as_uri() + "?" + query


def open_readonly(path: str | Path) -> ReadOnlyLog:
    """Open a log read-only without creating or changing any file next to it. Raises NotALogError.

    A log without a -wal file (or an empty one) is opened `immutable`; otherwise the database and its -wal
    are copied into a private directory (mode 0700, removed on close) and the copy is opened, so no -shm or
    -wal is created beside the evidence. The -wal is checked for frames SQLite would discard (see ReadOnlyLog).
    A log whose schema version is newer than this library's is refused (NotALogError).
    """
    p = Path(path)
    if not p.is_file():
        raise NotALogError(f"{p} does not exist or is not a file")
    wal = Path(str(p) + "-wal")
    try:
        has_wal = wal.is_file() and wal.stat().st_size > 0
    except OSError:
        has_wal = False
    copy_dir: str | None = None
    frames: list[int] = []
    try:
        if has_wal:
            copy_dir = tempfile.mkdtemp(prefix="events-verify-")
            target = Path(copy_dir) / "log.db"
            shutil.copyfile(
                wal, str(target) + "-wal"
            )  # the WAL first: frames appended meanwhile are harmless
            shutil.copyfile(p, target)
            _page, frames = wal_frames(Path(str(target) + "-wal"))
            valid = len(frames)
            if frames:
                probe = sqlite3.connect(str(target), isolation_level=None)
                try:  # on the private copy: how many frames SQLite accepts (mxFrame), then fold them in
                    row = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    valid = int(row[1]) if row and int(row[1]) >= 0 else len(frames)
                finally:
                    probe.close()
            conn = sqlite3.connect(str(target), isolation_level=None, factory=ReadOnlyLog)
            conn.copy_dir, copy_dir = copy_dir, None
            conn.uri = _sqlite_uri(target, "mode=ro")
            conn.execute("PRAGMA query_only = ON")
            conn.wal_frames = len(frames)
            conn.wal_valid_frames = valid
            conn.wal_lost_commits = sum(1 for c in frames[valid:] if c)
        else:
            conn = sqlite3.connect(_sqlite_uri(p, "immutable=1"), uri=True, factory=ReadOnlyLog)
            conn.uri = _sqlite_uri(p, "immutable=1")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.schema_version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise NotALogError(f"{p} is not an SQLite database: {exc}") from exc
    except OSError as exc:
        raise NotALogError(f"cannot read {p}: {exc}") from exc
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
    from .sqlite import SCHEMA_VERSION

    if conn.schema_version > SCHEMA_VERSION:
        conn.close()
        raise NotALogError(
            f"{p} has schema version {conn.schema_version}, newer than this version knows ({SCHEMA_VERSION}): "
            "it was written by a newer release; check it with that release's tools"
        )
    return conn


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if `a` and `b` name the same file (also through links), or `a` is `b`'s -wal/-shm/-journal."""
    pa, pb = Path(a), Path(b)
    for suffix in ("", "-wal", "-shm", "-journal"):
        other = Path(str(pb) + suffix)
        try:
            if pa.exists() and other.exists() and os.path.samefile(pa, other):
                return True
        except OSError:
            pass
        if pa.resolve() == other.resolve():
            return True
    return False


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
        self.versions: dict[Any, int] = {}  # stream id (str; bytes after the C scan) -> last version
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
        st.issue(
            pos, "position_out_of_range", f"a row at position {pos}: positions start at 1 (inserted row)"
        )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _c_scan(*args: Any) -> tuple[Any, ...]:
    try:
        out: tuple[Any, ...] = ACCELERATOR.scan(*args)
        return out
    except Exception as exc:  # never worse than without it: the Python scan reads the log and reports
        return ("anomaly", None, f"{type(exc).__name__}: {exc}")


def _split_scan(conn: sqlite3.Connection, uri: str, st: _Scan, wanted: list[int]) -> tuple[Any, ...] | None:
    """The C scan of a whole log as two ranges scanned at once (two threads; the C scan releases the GIL), joined
    at the seam exactly as one scan would check it: the first range ends at the middle row and its head is the
    hash the second range links to; each stream's first version in the second range follows its last one in
    the first; time does not go back across the seam. The same tuple as one scan, or None not to split."""
    if _cpus() < 2:
        return None
    try:
        row = conn.execute("SELECT max(position) FROM events").fetchone()
        top = row[0] if row else None
        if not isinstance(top, int) or top < SPLIT_AT:
            return None
        mid = top // 2
        row = conn.execute("SELECT hash FROM events WHERE position = ?", (mid,)).fetchone()
    except sqlite3.Error:
        return None
    seam = row[0] if row else None
    if not isinstance(seam, bytes) or len(seam) != 32:
        return None  # a damaged middle: one scan stops there
    outs: list[tuple[Any, ...]] = [(), ()]

    def second() -> None:
        outs[1] = _c_scan(uri, mid + 1, _NO_END, seam, -(2**63), TAG, [p for p in wanted if p > mid], 2)

    worker = threading.Thread(target=second, name="verify-second-half")
    worker.start()
    try:
        outs[0] = _c_scan(uri, st.expected, mid, st.prev, st.last_ts, TAG, [p for p in wanted if p <= mid], 1)
    finally:
        worker.join()
    a, b = outs
    if a[0] != "clean":
        return a
    if b[0] != "clean":
        return b
    _, count_a, next_a, head_a, ts_a, versions_a, types_a, hashes_a, _, _ = a
    _, count_b, next_b, head_b, ts_b, versions_b, types_b, hashes_b, firsts_b, first_ts_b = b
    if next_a != mid + 1 or head_a != seam:
        return ("anomaly", next_a, "the first range does not end at the seam")
    if count_b and first_ts_b < ts_a:
        return ("anomaly", mid + 1, "time_backwards at the seam")
    for sid, first in firsts_b.items():
        if first != versions_a.get(sid, 0) + 1:
            return ("anomaly", None, "stream_version_gap at the seam")
    types = dict(types_a)
    for et, top_version in types_b.items():
        types[et] = max(top_version, types.get(et, top_version))
    return (
        "clean",
        count_a + count_b,
        next_b,
        head_b,
        ts_b if count_b else ts_a,
        versions_a | versions_b,
        types,
        hashes_a | hashes_b,
        {},
        None,
    )


def _fast_scan(conn: sqlite3.Connection, st: _Scan) -> bool:
    """Run the C scan over the whole log; True if it found nothing _scan_rows would report (no issue, no
    warning) and `st` now holds what _scan_rows would have left in it (counts, head, last time, streams, the
    hashes at checkpointed positions). False (st untouched) if there is no C scan, or if it stopped at a row
    that _scan_rows must examine: the caller then runs _scan_rows from the start, which writes the report."""
    uri = getattr(conn, "uri", None)
    if ACCELERATOR is None or uri is None or st.count or st.expected != 1:
        return False
    wanted = sorted(p for p in st.wanted if 0 < p < _NO_END)  # (others are not in any log: no hash to keep)
    out = _split_scan(conn, uri, st, wanted)
    if out is None:
        out = _c_scan(uri, st.expected, _NO_END, st.prev, st.last_ts, TAG, wanted, 1)
    if out[0] != "clean":
        return False
    _, count, nxt, head, last_ts, versions, types, hashes, _, _ = out
    if st.known is not None:
        for et, top in types.items():
            cv = st.known.get(et.decode("utf-8", "surrogateescape"))
            if cv is None or top > cv:
                return False  # a warning to write: _scan_rows writes it
    if count:
        st.first = st.expected
        st.last = nxt - 1
    st.count = count
    st.expected = nxt
    st.prev = head
    st.last_ts = last_ts
    st.versions = versions
    st.hashes.update(hashes)
    return True


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
                    except (
                        UnicodeEncodeError
                    ):  # text read back byte-exact (not UTF-8 on disk): hash those bytes
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
                        st.issue(
                            pos, "stream_version_gap", f"stream {sid!r} goes from version {last_v} to {sv}"
                        )
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


def _check_wal(conn: ReadOnlyLog, st: _Scan, report: VerifyReport) -> None:
    report.wal_frames = conn.wal_frames
    report.wal_invalid_frames = conn.wal_frames - conn.wal_valid_frames
    if conn.wal_lost_commits:
        st.issue(
            st.last + 1,
            "wal_damaged",
            f"the write-ahead log has {report.wal_invalid_frames} frames after frame {conn.wal_valid_frames} that "
            f"SQLite discards as invalid, {conn.wal_lost_commits} of them ending committed transactions: events "
            "committed there are missing from what the log shows (damaged or edited -wal file)",
        )
    elif report.wal_invalid_frames:
        st.warn(
            st.last + 1,
            "wal_incomplete_frames",
            f"the write-ahead log ends with {report.wal_invalid_frames} frames SQLite discards (no committed "
            "transaction among them: an interrupted write)",
        )


def _check_schema_objects(conn: sqlite3.Connection, st: _Scan) -> None:
    from .sqlite import REPLACE_TRIGGERS_SINCE, TRIGGER_NAMES

    have = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    missing = sorted(TRIGGER_NAMES - have)
    if missing:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        old = version < REPLACE_TRIGGERS_SINCE and missing == sorted(n for n in missing if n.endswith("_no_replace"))
        st.warn(
            None,
            "triggers_missing" if not old else "old_schema",
            f"append-only triggers missing: {', '.join(missing)}"
            + (
                " (a log of schema version 1: the store adds them when it next opens the log)"
                if old
                else " (dropped: the file was edited by something other than the store)"
            ),
        )


def _check_snapshots(conn: sqlite3.Connection, st: _Scan) -> int:
    """Each stored snapshot must match a seal of the log (see events.snapshot) and the log's hash there."""
    from .snapshot import SEAL_TYPE, seal_matches, seal_stream, state_digest

    try:
        rows = conn.execute("SELECT name, position, head_hash, state FROM snapshots").fetchall()
    except sqlite3.DatabaseError:
        return 0
    for name, position, head_hash, data in rows:
        if not isinstance(position, int) or not isinstance(head_hash, bytes) or not isinstance(data, bytes):
            st.issue(None, "snapshot_forged", f"snapshot {name!r} has malformed columns")
            continue
        seals = []
        for (payload,) in conn.execute(
            "SELECT payload FROM events WHERE stream_id = ? AND event_type = ?",
            (seal_stream(str(name)), SEAL_TYPE),
        ):
            try:
                seals.append(loads(payload))
            except (ValueError, TypeError):
                continue
        hrow = conn.execute("SELECT hash FROM events WHERE position = ?", (position,)).fetchone()
        if hrow is None:
            st.issue(
                position,
                "snapshot_forged",
                f"snapshot {name!r} was taken at position {position}, which the log does not have (cut short?)",
            )
            continue
        if bytes(hrow[0]) != head_hash:
            st.issue(
                position,
                "snapshot_forged",
                f"snapshot {name!r} claims head hash {head_hash.hex()[:16]}... at position {position}, the log "
                "differs there: a daemon would ignore it",
            )
            continue
        digest = state_digest(data)
        if any(seal_matches(p, str(name), position, head_hash, digest) for p in seals):
            continue
        if not seals:
            st.warn(
                position,
                "snapshot_unsealed",
                f"snapshot {name!r} at position {position} has no seal in the log (written before seals, or "
                "by another tool): it is not trusted",
            )
        else:
            st.issue(
                position,
                "snapshot_forged",
                f"snapshot {name!r} at position {position} matches no snapshot.sealed event of the log (its "
                "state was edited): a daemon ignores it and folds the log",
            )
    return len(rows)


def _check_checkpoint_sequence(cps: list[Checkpoint], st: _Scan) -> None:
    """Numbered checkpoints (in file order) go 1, 2, 3... and each links to the one before it."""
    before: Checkpoint | None = None
    for c in cps:
        if c.seq == 0:
            continue
        expected = 1 if before is None else before.seq + 1
        if c.seq > expected:
            st.warn(
                None,
                "checkpoint_gap",
                f"checkpoints #{expected}..#{c.seq - 1} are missing from the file (lines deleted)",
            )
        elif c.seq < expected:
            st.warn(None, "checkpoint_out_of_order", f"checkpoint #{c.seq} follows #{expected - 1}")
        elif before is not None and c.prev != before.digest():
            st.issue(
                None,
                "checkpoint_chain_broken",
                f"checkpoint #{c.seq} does not link to checkpoint #{before.seq} before it (a line was replaced)",
            )
        before = c


def verify_chain_range(
    conn: sqlite3.Connection, after_position: int, after_hash: bytes, to_position: int | None = None
) -> tuple[int, bytes]:
    """Recompute the rows after `after_position` (whose hash `after_hash` the caller vouches for: the genesis
    hash, a signed checkpoint, a sealed snapshot, or an earlier call) up to `to_position` (default: the end).
    Returns (last position, its hash); raises LogIntegrityError at the first row that does not link, hash or
    follow. The incremental check a daemon runs at start and before it signs.

    The C scan (if built) vouches for a clean range; a range it does not vouch for is read again here, so the
    result or the error is always this function's own."""
    if to_position is None and ACCELERATOR is not None:
        row = conn.execute("SELECT max(position) FROM events").fetchone()
        top = row[0] if row and isinstance(row[0], int) else None
    else:
        top = to_position
    if top is not None and top > after_position:
        fast = _fast_range(conn, after_position, after_hash, top)
        if fast is not None and (to_position is None or fast[0] >= to_position):
            return fast
    chain = ChainCheck(after_position, after_hash, "surrogateescape")
    end = 2**62 if to_position is None else to_position
    factory = conn.text_factory
    try:
        while True:
            cur = conn.execute(
                f"SELECT {COLUMNS} FROM events WHERE position >= ? AND position <= ? ORDER BY position",
                (chain.expected, end),
            )
            cur.arraysize = FETCH
            try:
                chain.check(cur)
                break
            except sqlite3.OperationalError as exc:
                if "decode" not in str(exc) or conn.text_factory is _surrogate_text:
                    raise
                conn.text_factory = _surrogate_text  # as _scan_rows: text that is not UTF-8, byte-exact; read
                # again from the first row not yet checked
    finally:
        conn.text_factory = factory
    if to_position is not None and chain.expected - 1 < to_position:
        raise LogIntegrityError(
            f"the log ends at position {chain.expected - 1}, before position {to_position}",
            position=chain.expected,
            kind="truncated",
        )
    return chain.last


def _reopen_uri(conn: sqlite3.Connection) -> str | None:
    """A URI that opens the same database read-only (for the C scan's own connection), or None."""
    uri = getattr(conn, "uri", None)
    if uri is not None or conn.in_transaction:
        return uri if isinstance(uri, str) else None
    for _seq, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return _sqlite_uri(Path(file), "mode=ro")
    return None


def _fast_range(
    conn: sqlite3.Connection, after_position: int, after_hash: bytes, to_position: int
) -> tuple[int, bytes] | None:
    """(last position, its hash) if the C scan found positions after_position+1..to_position all present,
    linked and hashing right; None if it is not built or stopped at a row (verify_chain_range then decides)."""
    uri = _reopen_uri(conn) if ACCELERATOR is not None else None
    if uri is None or not isinstance(after_hash, bytes) or len(after_hash) != 32 or after_position < 0:
        return None
    try:
        out = ACCELERATOR.scan(uri, after_position + 1, to_position, after_hash, -(2**63), TAG, (), 0)
    except Exception:  # never worse than without it: verify_chain_range reads the range itself
        return None
    if out[0] != "clean":
        return None
    return int(out[2]) - 1, bytes(out[3])


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
            pk = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
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
            report.types_checked = known is not None
            report.schema_version = conn.schema_version
            try:
                _scan_out_of_range(conn, st)
                if on_row is not None or not _fast_scan(conn, st):
                    _scan_rows(conn, st, on_row)
            except sqlite3.DatabaseError as exc:
                if st.count == 0 and "no such table" in str(exc):
                    raise NotALogError(f"not an event log: {exc}") from exc
                st.issue(st.expected, "unreadable", f"the database cannot be read past here: {exc}")
            _check_wal(conn, st, report)
            _check_schema_objects(conn, st)
            report.snapshots_checked = _check_snapshots(conn, st)
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
    for lineno, why in bad_cps:
        st.issue(None, "checkpoint_invalid", f"checkpoint line {lineno}: {why}")
    for c in cps:
        if c.log_id != log_id:
            st.issue(
                None, "checkpoint_other_log", f"a checkpoint is for log {c.log_id}, this log is {log_id}"
            )
    _check_checkpoint_sequence(cps, st)
    if checkpoints is not None and not own:
        st.warn(None, "no_checkpoints", "the checkpoints file holds no checkpoint of this log")
    if own:
        report.checkpoints_valid = len(own)
        newest = max(own, key=lambda c: (c.position, c.seq, c.time))
        report.newest_checkpoint_seq = max(c.seq for c in own) or None
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
            if not isinstance(have, bytes) or have.hex() != c.head_hash:  # (a forged hash may be text)
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
    report.warnings = st.warnings
    report.issues = st.issues
    if st.issues:
        report.status = "tampered"
        located = [i for i in st.issues if i.position is not None]
        first = min(located, key=lambda i: i.position or 0) if located else st.issues[0]
        report.first_bad_position = first.position
        report.reason = f"{first.kind}: {first.message}"
    return report
