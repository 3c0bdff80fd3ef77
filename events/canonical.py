"""Canonical JSON: the exact bytes stored and hashed for a payload."""

from __future__ import annotations

import json
from typing import Any

_encoder = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=True
)
_encode = _encoder.encode


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON (sorted keys, no spaces, UTF-8, no NaN/Infinity).

    Raises ValueError/TypeError when the value cannot be represented (the caller turns these into
    PayloadError with the event at fault).
    """
    return _encode(value).encode("utf-8")


def canonical_text(value: Any) -> str:
    """Like canonical_json but returns str (callers choose the error handler of the UTF-8 step)."""
    return _encode(value)


def loads(data: bytes | str) -> Any:
    """Decode JSON produced by canonical_json."""
    return json.loads(data)
