"""Signed checkpoints: (log id, position, head hash, time, seq, prev) signed with an Ed25519 key kept outside
the database, appended as JSON lines to a file meant to be shipped off the host.

A chain alone can be rewritten end to end by whoever holds the file; a checkpoint held elsewhere makes
truncation and wholesale rewriting detectable. Checkpoints are numbered (`seq`, 1, 2, ... per file) and each
carries the digest of the one before it (`prev`), so a line deleted from the middle of the file is a gap
that verify reports. Deleting the newest lines (or the whole file) is only visible against a copy kept off
the host: verify prints how many checkpoints it checked and the newest sealed position for that comparison.
Lines written before numbering (no `seq`) are still accepted, as unnumbered checkpoints.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .canonical import canonical_json
from .errors import CheckpointError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from .store import EventStore

# cryptography is imported where keys are used, not with the module: ~8 MiB of resident memory (its Rust
# extension) in every process that imports `events` (the daemon) whether or not a key is configured.

SIGN_TAG = b"events.checkpoint.v1\x00"
SIGN_TAG_V2 = b"events.checkpoint.v2\x00"
FILE_MODE = 0o640
PRIVATE_KEY_NAME = "checkpoint-ed25519.key"
PUBLIC_KEY_NAME = "checkpoint-ed25519.pub"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    log_id: str
    position: int
    head_hash: str  # hex
    time: str  # ISO 8601 UTC
    signature: str = ""  # hex
    seq: int = 0  # 1, 2, ... in its file; 0 = an unnumbered checkpoint of the first format
    prev: str = ""  # digest() of the checkpoint before it in the file ("" for the first)

    def message(self) -> bytes:
        """The bytes that are signed."""
        body: dict[str, Any] = {
            "log_id": self.log_id,
            "position": self.position,
            "head_hash": self.head_hash,
            "time": self.time,
        }
        if self.seq == 0:
            return SIGN_TAG + canonical_json(body)
        return SIGN_TAG_V2 + canonical_json(body | {"seq": self.seq, "prev": self.prev})

    def digest(self) -> str:
        """What the next checkpoint's `prev` holds: SHA-256 of this one's signed message and signature."""
        return hashlib.sha256(self.message() + bytes.fromhex(self.signature)).hexdigest()

    def to_json(self) -> str:
        d = asdict(self)
        if self.seq == 0:
            del d["seq"], d["prev"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


# ---- keys ------------------------------------------------------------------------------------------------
def generate_keys(directory: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair in `directory`: the private key (PEM, mode 0600) and the public key.

    Refuses to overwrite an existing private key.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_KEY_NAME, d / PUBLIC_KEY_NAME
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise CheckpointError(
            f"{priv_path} already exists; refusing to overwrite a key", field="directory"
        ) from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(priv_path, 0o600)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub)
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the private key {path}: {exc}", field="key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path} is not an Ed25519 private key", field="key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
        key: Any = (
            serialization.load_pem_private_key(data, password=None).public_key()
            if b"PRIVATE KEY" in data
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the public key {path}: {exc}", field="public_key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError(f"{path} is not an Ed25519 public key", field="public_key")
    return key


# ---- writing -------------------------------------------------------------------------------------------
def sign_checkpoint(
    key: Ed25519PrivateKey, log_id: str, position: int, head_hash: bytes, seq: int = 0, prev: str = ""
) -> Checkpoint:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    unsigned = Checkpoint(log_id, position, head_hash.hex(), now, "", seq, prev)
    return Checkpoint(log_id, position, head_hash.hex(), now, key.sign(unsigned.message()).hex(), seq, prev)


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    chunk = 1 << 16
    start = max(0, size - chunk)
    while True:
        data = os.pread(fd, size - start, start)
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        if len(lines) > 1 or start == 0:
            return lines[-1] if lines else None
        start = max(0, start - chunk)


def _open_for_append(out: str | Path) -> int:
    try:
        fd = os.open(out, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        return fd
    except FileExistsError:
        return os.open(out, os.O_RDWR | os.O_APPEND)


def append_checkpoint(out: str | Path, checkpoint: Checkpoint) -> None:
    """Append one JSON line (as signed) and fsync it."""
    fd = _open_for_append(out)
    try:
        os.write(fd, (checkpoint.to_json() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def sign_and_append(
    out: str | Path, key: Ed25519PrivateKey, log_id: str, position: int, head_hash: bytes
) -> Checkpoint:
    """Sign the next numbered checkpoint of `out` (seq and prev from its last line, under an exclusive lock,
    so two signers never take the same number) and append it. A new file is created 0640."""
    fd = _open_for_append(out)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_line(fd)
        seq, prev = 1, ""
        if last is not None:
            try:
                before = _parse_line(last)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise CheckpointError(
                    f"{out} ends with a line that is not a checkpoint ({exc}); refusing to extend it",
                    field="checkpoints",
                ) from exc
            seq, prev = before.seq + 1, before.digest()
        cp = sign_checkpoint(key, log_id, position, head_hash, seq, prev)
        os.write(fd, (cp.to_json() + "\n").encode())
        os.fsync(fd)
        return cp
    finally:
        os.close(fd)  # releases the lock


def _as_private_key(key: Ed25519PrivateKey | str | Path) -> Ed25519PrivateKey:
    return load_private_key(key) if isinstance(key, (str, Path)) else key


async def async_checkpoint_store(
    store: EventStore, key: Ed25519PrivateKey | str | Path, out: str | Path
) -> Checkpoint:
    """Sign the store's current head and append it to `out` (numbered, chained to the previous line)."""
    position, head = await store.async_head()
    private = _as_private_key(key)
    return await asyncio.to_thread(sign_and_append, out, private, store.log_id, position, head)


def checkpoint_db(db_path: str | Path, key: Ed25519PrivateKey | str | Path, out: str | Path) -> Checkpoint:
    """Sign the head of the log file at `db_path` (read-only) and append it to `out`.

    Refuses (CheckpointError) an `out` that is the database or one of its -wal/-shm files."""
    from .verify import open_readonly, read_head, same_file

    if same_file(out, db_path):
        raise CheckpointError(
            f"--out {out} is the log itself: refusing to write into the evidence", field="out"
        )
    conn = open_readonly(db_path)
    try:
        log_id, position, head = read_head(conn)
    finally:
        conn.close()
    return sign_and_append(out, _as_private_key(key), log_id, position, head)


# ---- reading -------------------------------------------------------------------------------------------
def parse_checkpoints(
    path: str | Path, public_key: Ed25519PublicKey
) -> tuple[list[Checkpoint], list[tuple[int, str]]]:
    """(checkpoints with a valid signature, [(line number, problem)] for the others).

    Raises CheckpointError only when the file cannot be read; a line that is not a well-formed, validly
    signed checkpoint (bad JSON or UTF-8, wrong field types, bad signature) is reported in the second list.
    """
    from cryptography.exceptions import InvalidSignature

    good: list[Checkpoint] = []
    bad: list[tuple[int, str]] = []
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoints {path}: {exc}", field="checkpoints") from exc
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            cp = _parse_line(raw)
            public_key.verify(bytes.fromhex(cp.signature), cp.message())
        except InvalidSignature:
            bad.append((lineno, "signature does not verify"))
            continue
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            bad.append((lineno, f"malformed checkpoint line: {type(exc).__name__}: {exc}"))
            continue
        good.append(cp)
    return good, bad


def _parse_line(raw: bytes) -> Checkpoint:
    d = json.loads(raw.decode("utf-8"))
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    position = d["position"]
    if type(position) is not int:
        raise ValueError(f"position must be an integer, got {position!r}")
    text = {k: d[k] for k in ("log_id", "head_hash", "time", "signature")}
    seq = d.get("seq", 0)
    if type(seq) is not int or seq < 0:
        raise ValueError(f"seq must be an integer >= 0, got {seq!r}")
    text["prev"] = d.get("prev", "")
    for key, value in text.items():
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
    bytes.fromhex(text["signature"])
    return Checkpoint(
        text["log_id"], position, text["head_hash"], text["time"], text["signature"], seq, text["prev"]
    )


def load_checkpoints(path: str | Path, public_key: Ed25519PublicKey | str | Path) -> list[Checkpoint]:
    """Checkpoints of `path`, all verified; raises CheckpointError on the first bad one."""
    pk = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
    good, bad = parse_checkpoints(path, pk)
    if bad:
        lineno, why = bad[0]
        raise CheckpointError(f"{path} line {lineno}: {why}", field="checkpoints")
    return good


__all__ = [
    "Checkpoint",
    "append_checkpoint",
    "async_checkpoint_store",
    "checkpoint_db",
    "generate_keys",
    "load_checkpoints",
    "load_private_key",
    "load_public_key",
    "parse_checkpoints",
    "sign_and_append",
    "sign_checkpoint",
]
