"""Snapshots: a projection's state at position P plus the head hash at P, bound to the chain by a seal.

The snapshots table is not the log: whoever can write the file can rewrite a row of it without touching a
single hash of the chain. A sealed snapshot is therefore only trusted when the log itself vouches for it:
`async_save_sealed_snapshot` first appends a `snapshot.sealed` event (stream `snapshot-<name>`) recording the
snapshot's position, the head hash there and the SHA-256 of its canonical JSON, then stores the row.
`async_load_sealed_snapshot` accepts a row only if some seal in the log records exactly that digest, position
and head hash, and the log still has that head hash at the position; anything else is ignored (with the
reason), and the caller folds from the log. `events.verify` reports rows no seal vouches for.

Forging a sealed snapshot therefore means appending a forged seal to the chain: an event anyone can see in
the log, caught by a verifier that folds the log and compares (`moldd-audit verify`), and by checkpoints if
it is placed anywhere but the unsealed tail. With a signing key (the checkpoint key), the seal also carries an
Ed25519 signature and a loader given the public key accepts only signed seals: then forging one needs the key.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .canonical import canonical_json, loads
from .envelope import NewEvent, Snapshot, us_to_datetime
from .store import system_clock_us

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from .replay import Projection
    from .store import EventStore

__all__ = [
    "SEAL_TYPE",
    "Snapshot",
    "async_load_sealed_snapshot",
    "async_load_valid_snapshot",
    "async_save_sealed_snapshot",
    "async_save_sealed_snapshot_data",
    "async_take_snapshot",
    "seal_stream",
    "state_digest",
]

SEAL_TYPE = "snapshot.sealed"
SEAL_STREAM_PREFIX = "snapshot-"
_SEAL_SCAN = 16


def seal_stream(name: str) -> str:
    """The stream that holds the seals of the snapshot `name`."""
    return SEAL_STREAM_PREFIX + name


def state_digest(data: bytes) -> str:
    """Hex SHA-256 of a snapshot's stored canonical JSON."""
    return hashlib.sha256(data).hexdigest()


def seal_matches(payload: Any, name: str, position: int, head_hash: bytes, digest: str) -> bool:
    return (
        isinstance(payload, dict)
        and payload.get("name") == name
        and payload.get("position") == position
        and payload.get("head_hash") == head_hash.hex()
        and payload.get("digest") == digest
    )


async def async_take_snapshot(
    store: EventStore, name: str, projection: Projection[Any], state: Any, position: int
) -> Snapshot:
    """Save `projection.to_snapshot(state)` as the snapshot `name` at `position` (unsealed)."""
    return await store.async_save_snapshot(name, position, projection.to_snapshot(state))


async def async_load_valid_snapshot(store: EventStore, name: str) -> Snapshot | None:
    """The snapshot `name` if the log still has the same head hash at its position, else None.

    Checks no seal: use async_load_sealed_snapshot where the snapshots table may be untrusted."""
    snap = await store.async_load_snapshot(name)
    if snap is None:
        return None
    if await store.async_hash_at(snap.position) != snap.head_hash:
        return None
    return snap


SEAL_SIGN_TAG = b"events.snapshot-seal.v1\x00"


def _seal_message(log_id: str, payload: dict[str, Any]) -> bytes:
    body = {k: payload[k] for k in ("name", "position", "head_hash", "digest")}
    return SEAL_SIGN_TAG + canonical_json(body | {"log_id": log_id})


def seal_signature_ok(public_key: Ed25519PublicKey, log_id: str, payload: Any) -> bool:
    from cryptography.exceptions import InvalidSignature  # (imported with a key, not with the module)

    try:
        public_key.verify(bytes.fromhex(payload["signature"]), _seal_message(log_id, payload))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
    return True


async def async_save_sealed_snapshot(
    store: EventStore,
    name: str,
    position: int,
    state: dict[str, Any],
    *,
    actor: str = "system",
    key: Ed25519PrivateKey | None = None,
) -> tuple[Snapshot, int]:
    """Append the seal of `state` at `position`, then store the snapshot. Returns (snapshot, seal position).

    Raises ValueError if the log ends before `position`; what async_append raises otherwise (nothing stored).
    """
    data = canonical_json(state)
    head_hash, seal_position = await _async_seal(store, name, position, data, actor=actor, key=key)
    now = system_clock_us()
    await store._async_put_snapshot(name, (position, head_hash, data, now))
    return Snapshot(name, position, head_hash, loads(data), us_to_datetime(now)), seal_position


async def async_save_sealed_snapshot_data(
    store: EventStore,
    name: str,
    position: int,
    data: bytes,
    *,
    actor: str = "system",
    key: Ed25519PrivateKey | None = None,
) -> tuple[int, int]:
    """async_save_sealed_snapshot for a state the caller already encoded as canonical JSON (e.g. off the event
    loop): the seal records the digest of `data`, which is stored as is. Returns (position, seal position)."""
    _, seal_position = await _async_seal(store, name, position, data, actor=actor, key=key)
    await store.async_save_snapshot_data(name, position, data)
    return position, seal_position


async def _async_seal(
    store: EventStore, name: str, position: int, data: bytes, *, actor: str, key: Ed25519PrivateKey | None
) -> tuple[bytes, int]:
    """Append the seal of the snapshot bytes `data` at `position`: (head hash there, the seal's position).
    Raises ValueError if the log ends before `position`; what async_append raises otherwise."""
    head_hash = await store.async_hash_at(position)
    if head_hash is None:
        raise ValueError(f"cannot snapshot at position {position}: the log ends before it")
    payload: dict[str, Any] = {
        "name": name,
        "position": position,
        "head_hash": head_hash.hex(),
        "digest": state_digest(data),
    }
    if key is not None:
        payload["signature"] = key.sign(_seal_message(store.log_id, payload)).hex()
    sealed = await store.async_append(seal_stream(name), [NewEvent(SEAL_TYPE, payload, actor=actor)])
    return head_hash, sealed.last_position


async def async_load_sealed_snapshot(
    store: EventStore, name: str, public_key: Ed25519PublicKey | None = None
) -> tuple[Snapshot | None, str | None, int]:
    """(snapshot, None, seal position) if a seal in the log vouches for the stored snapshot `name` (with
    `public_key`: a seal signed by its private key); (None, why it is not trusted, 0) if not; (None, None, 0)
    if there is none."""
    store._check_open()
    row = await store._async_get_snapshot(name)
    if row is None:
        return None, None, 0
    position, head_hash, data, created_us = row
    head_hash, data = bytes(head_hash), bytes(data)
    if await store.async_hash_at(position) != head_hash:
        return None, f"the log's hash at position {position} is not the snapshot's head hash", 0
    digest = state_digest(data)
    seal_at = await _async_find_seal(store, name, position, head_hash, digest, public_key)
    if seal_at is None:
        return None, "no snapshot.sealed event of the log records this snapshot (forged or unsealed)", 0
    try:
        state = loads(data)
    except ValueError as exc:
        return None, f"the snapshot is not JSON: {exc}", 0
    return Snapshot(name, position, head_hash, state, us_to_datetime(created_us)), None, seal_at


async def _async_find_seal(
    store: EventStore,
    name: str,
    position: int,
    head_hash: bytes,
    digest: str,
    public_key: Ed25519PublicKey | None,
) -> int | None:
    stream = seal_stream(name)
    versions, _ = await store._async_lookup({stream}, set())
    top = versions.get(stream, 0)
    while top > 0:
        bottom = max(1, top - _SEAL_SCAN + 1)
        batch = await store.async_read_stream(stream, bottom, top)
        for ev in batch[::-1]:
            p = ev.payload
            if ev.event_type == SEAL_TYPE and seal_matches(p, name, position, head_hash, digest):
                if public_key is None or seal_signature_ok(public_key, store.log_id, p):
                    return ev.position
            if isinstance(p, dict) and isinstance(p.get("position"), int) and p["position"] < position:
                return None  # seals are in snapshot order: older ones seal earlier positions
        top = bottom - 1
    return None
