"""The hash chain: each row's hash covers the previous hash, its position and every stored field.

hash_n = SHA-256(TAG ‖ hash_{n-1} ‖ u64 position ‖ u64 stream_version ‖ i64 recorded_at_us
                 ‖ u32 schema_version ‖ u32 len(fields) ‖ fields ‖ payload)
fields = canonical JSON [stream_id, event_type, actor, command_id, causation_id, correlation_id]
payload = the payload bytes exactly as stored
genesis = SHA-256(GENESIS_TAG ‖ log_id)
"""

from __future__ import annotations

import hashlib
import struct

from .canonical import canonical_text

TAG = b"events.chain.v1\x00"
GENESIS_TAG = b"events.genesis.v1\x00"
HASH_SIZE = 32

_sha256 = hashlib.sha256
_pack = struct.Struct(">QQqII").pack


def genesis_hash(log_id: str) -> bytes:
    """The hash that position 1 links to; binds the chain to one log id."""
    return _sha256(GENESIS_TAG + log_id.encode("utf-8")).digest()


def encode_fields(
    stream_id: str,
    event_type: str,
    actor: str,
    command_id: str | None,
    causation_id: str | None,
    correlation_id: str | None,
    errors: str = "strict",
) -> bytes:
    """Canonical bytes of the envelope's string fields (None stays null, distinct from "")."""
    return canonical_text([stream_id, event_type, actor, command_id, causation_id, correlation_id]).encode(
        "utf-8", errors
    )


def link_hash(
    prev_hash: bytes,
    position: int,
    stream_version: int,
    recorded_at_us: int,
    schema_version: int,
    fields: bytes,
    payload: bytes,
) -> bytes:
    """The hash of one row given the previous row's hash."""
    return _sha256(
        b"".join(
            (
                TAG,
                prev_hash,
                _pack(position, stream_version, recorded_at_us, schema_version, len(fields)),
                fields,
                payload,
            )
        )
    ).digest()
