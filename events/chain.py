"""The hash chain: each row's hash covers the previous hash, its position and every stored field.

hash_n = SHA-256(TAG ‖ hash_{n-1} ‖ u64 position ‖ u64 stream_version ‖ i64 recorded_at_us
                 ‖ u32 schema_version ‖ fields ‖ payload)
fields = i32 length of each of [stream_id, event_type, actor, command_id, causation_id, correlation_id]
         (the UTF-8 byte length as stored; -1 for NULL, so None stays distinct from "")
         ‖ the UTF-8 bytes of those six fields, concatenated in that order
payload = the payload bytes exactly as stored (everything after the fields)
genesis = SHA-256(GENESIS_TAG ‖ log_id)

Every part before the payload has a fixed size or an explicit length, and the payload is the rest, so the
hashed bytes decode to exactly one envelope: two different envelopes never hash the same bytes. The text
fields are hashed as the bytes SQLite stores (UTF-8), so verify hashes the columns it reads without any
re-serialisation (no JSON).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import LogIntegrityError

TAG = b"events.chain.v2\x00"
GENESIS_TAG = b"events.genesis.v1\x00"
HASH_SIZE = 32
NULL_LENGTH = -1

_sha256 = hashlib.sha256
INTS = struct.Struct(">QQqI")
"""position, stream_version, recorded_at_us, schema_version."""
LENGTHS = struct.Struct(">iiiiii")
"""Byte lengths of the six text fields (-1 = NULL)."""
HEADER = struct.Struct(">QQqIiiiiii")
"""INTS followed by LENGTHS (big-endian, no padding: HEADER.pack(*a, *b) == INTS.pack(*a) + LENGTHS.pack(*b))."""
_pack_ints = INTS.pack
_pack_lengths = LENGTHS.pack


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
    """Length-framed UTF-8 bytes of the envelope's text fields (None is length -1, distinct from "").

    `errors` is the UTF-8 error handler ("surrogateescape" re-creates bytes read back from a damaged file).
    """
    s = stream_id.encode("utf-8", errors)
    t = event_type.encode("utf-8", errors)
    a = actor.encode("utf-8", errors)
    c = b"" if command_id is None else command_id.encode("utf-8", errors)
    ca = b"" if causation_id is None else causation_id.encode("utf-8", errors)
    co = b"" if correlation_id is None else correlation_id.encode("utf-8", errors)
    return b"".join(
        (
            _pack_lengths(
                len(s),
                len(t),
                len(a),
                NULL_LENGTH if command_id is None else len(c),
                NULL_LENGTH if causation_id is None else len(ca),
                NULL_LENGTH if correlation_id is None else len(co),
            ),
            s,
            t,
            a,
            c,
            ca,
            co,
        )
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
    """The hash of one row given the previous row's hash (`fields` from encode_fields)."""
    return _sha256(
        b"".join(
            (
                TAG,
                prev_hash,
                _pack_ints(position, stream_version, recorded_at_us, schema_version),
                fields,
                payload,
            )
        )
    ).digest()


class ChainCheck:
    """Recomputes stored rows (columns in storage order, position order) that follow `after_position`, whose hash
    `after_hash` the caller vouches for (the genesis hash, a signed checkpoint, a sealed snapshot, an earlier
    check). `check(rows)` may be called again with the rows that follow (pages, or a query re-run from
    `expected`): `expected` and `prev` always describe the last row that passed. Raises LogIntegrityError at the
    first row that does not follow, link or hash. `errors` is the UTF-8 handler of the text columns
    ("surrogateescape" re-creates the bytes of text that is not UTF-8, read back from a damaged file)."""

    __slots__ = ("errors", "expected", "prev")

    def __init__(self, after_position: int, after_hash: bytes, errors: str = "strict") -> None:
        self.expected = after_position + 1
        self.prev = after_hash
        self.errors = errors

    @property
    def last(self) -> tuple[int, bytes]:
        """(position, hash) of the last row that passed; `(after_position, after_hash)` before any row."""
        return self.expected - 1, self.prev

    def check(self, rows: Iterable[Sequence[Any]]) -> tuple[int, bytes]:
        sha256 = _sha256
        join = b"".join
        pack = HEADER.pack
        unpack_lengths = LENGTHS.unpack_from
        skip = LENGTHS.size
        errors = self.errors
        try:
            for row in rows:
                pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, prev_h, h = row
                expected = self.expected
                if pos != expected:
                    raise LogIntegrityError(
                        f"position {expected}: missing (the next row is at {pos})",
                        position=expected,
                        kind="position_gap",
                    )
                prev_h = bytes(prev_h)
                if prev_h != self.prev:
                    raise LogIntegrityError(
                        f"position {pos}: prev_hash does not match the hash of position {pos - 1}",
                        position=pos,
                        kind="broken_link",
                    )
                fields = encode_fields(sid, et, actor, cid, caus, corr, errors)
                header = pack(pos, sv, ts, schv, *unpack_lengths(fields))
                h = bytes(h)
                if sha256(join((TAG, prev_h, header, fields[skip:], bytes(payload)))).digest() != h:
                    raise LogIntegrityError(
                        f"position {pos}: the row's content does not match its hash",
                        position=pos,
                        kind="hash_mismatch",
                    )
                self.prev = h
                self.expected = pos + 1
        except (TypeError, ValueError, struct.error, OverflowError, AttributeError) as exc:
            raise LogIntegrityError(
                f"position {self.expected}: a column has an impossible value: {exc}",
                position=self.expected,
                kind="malformed_row",
            ) from exc
        return self.last


def check_rows(rows: Iterable[Sequence[Any]], after_position: int, after_hash: bytes) -> tuple[int, bytes]:
    """`ChainCheck(after_position, after_hash).check(rows)`: the page-at-a-time check of a log that is not a file
    (events.postgres: verify at start, before signing)."""
    return ChainCheck(after_position, after_hash).check(rows)
