"""Signed checkpoints: (log id, position, head hash, time) signed with an Ed25519 key kept outside the
database, appended as JSON lines to a file meant to be shipped off the host.

A chain alone can be rewritten end to end by whoever holds the file; a checkpoint held elsewhere makes
truncation and wholesale rewriting detectable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .canonical import canonical_json
from .errors import CheckpointError

if TYPE_CHECKING:
    from .store import EventStore

SIGN_TAG = b"events.checkpoint.v1\x00"
PRIVATE_KEY_NAME = "checkpoint-ed25519.key"
PUBLIC_KEY_NAME = "checkpoint-ed25519.pub"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    log_id: str
    position: int
    head_hash: str  # hex
    time: str  # ISO 8601 UTC
    signature: str = ""  # hex

    def message(self) -> bytes:
        """The bytes that are signed."""
        body = {
            "log_id": self.log_id,
            "position": self.position,
            "head_hash": self.head_hash,
            "time": self.time,
        }
        return SIGN_TAG + canonical_json(body)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


# ---- keys ------------------------------------------------------------------------------------------------
def generate_keys(directory: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair in `directory`: the private key (PEM, mode 0600) and the public key.

    Refuses to overwrite an existing private key.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_KEY_NAME, d / PUBLIC_KEY_NAME
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
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the private key {path}: {exc}", field="key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path} is not an Ed25519 private key", field="key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
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
def sign_checkpoint(key: Ed25519PrivateKey, log_id: str, position: int, head_hash: bytes) -> Checkpoint:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    unsigned = Checkpoint(log_id, position, head_hash.hex(), now)
    return Checkpoint(log_id, position, head_hash.hex(), now, key.sign(unsigned.message()).hex())


def append_checkpoint(out: str | Path, checkpoint: Checkpoint) -> None:
    """Append one JSON line and fsync it."""
    with open(out, "a", encoding="utf-8") as f:
        f.write(checkpoint.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _as_private_key(key: Ed25519PrivateKey | str | Path) -> Ed25519PrivateKey:
    return key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)


async def async_checkpoint_store(
    store: EventStore, key: Ed25519PrivateKey | str | Path, out: str | Path
) -> Checkpoint:
    """Sign the store's current head and append it to `out`."""
    position, head = await store.async_head()
    cp = sign_checkpoint(_as_private_key(key), store.log_id, position, head)
    append_checkpoint(out, cp)
    return cp


def checkpoint_db(db_path: str | Path, key: Ed25519PrivateKey | str | Path, out: str | Path) -> Checkpoint:
    """Sign the head of the log file at `db_path` (read-only) and append it to `out`."""
    from .verify import open_readonly, read_head

    conn = open_readonly(db_path)
    try:
        log_id, position, head = read_head(conn)
    finally:
        conn.close()
    cp = sign_checkpoint(_as_private_key(key), log_id, position, head)
    append_checkpoint(out, cp)
    return cp


# ---- reading -------------------------------------------------------------------------------------------
def parse_checkpoints(
    path: str | Path, public_key: Ed25519PublicKey
) -> tuple[list[Checkpoint], list[tuple[int, str]]]:
    """(checkpoints with a valid signature, [(line number, problem)] for the others).

    Raises CheckpointError only when the file cannot be read; a line that is not a well-formed, validly
    signed checkpoint (bad JSON or UTF-8, wrong field types, bad signature) is reported in the second list.
    """
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
    for key, value in text.items():
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
    return Checkpoint(text["log_id"], position, text["head_hash"], text["time"], text["signature"])


def load_checkpoints(path: str | Path, public_key: Ed25519PublicKey | str | Path) -> list[Checkpoint]:
    """Checkpoints of `path`, all verified; raises CheckpointError on the first bad one."""
    pk = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
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
    "sign_checkpoint",
]
