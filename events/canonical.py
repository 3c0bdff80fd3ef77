"""Canonical JSON: the exact bytes stored and hashed for a payload."""

from __future__ import annotations

import json
import json.encoder
from json.decoder import JSONDecoder
from typing import Any

import orjson

c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # the C accelerator (None without it)

_encoder = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=True
)
_encode = _encoder.encode

# The same C encoder JSONEncoder.encode builds on every call, built once and without the cycle check (so it
# keeps no state and is safe to share). A cycle, or nesting too deep, ends in RecursionError; the checking
# encoder then runs to raise what it always raised (ValueError for a cycle). Same output, byte for byte.
_fast_encode: Any = (
    c_make_encoder(None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    if c_make_encoder is not None
    else None
)
_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError
_ALL_DIGITS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19


def may_have_long_int(data: bytes) -> bool:
    """Whether a JSON text may hold an integer orjson would not decode exactly (beyond 64 bits): a run of 19
    digits. (Every digit made a 0, then one substring search: ~20x a regex on a snapshot of 100 MiB.)"""
    return data.translate(_ALL_DIGITS_ZERO).find(_NINETEEN_DIGITS) >= 0


_scan_once: Any = getattr(JSONDecoder(), "scan_once")  # noqa: B009 - not in the typeshed stubs


def canonical_json(value: Any) -> bytes:
    """Encode `value` as canonical JSON (sorted keys, no spaces, UTF-8, no NaN/Infinity).

    Raises ValueError/TypeError when the value cannot be represented (the caller turns these into
    PayloadError with the event at fault).
    """
    return canonical_text(value).encode("utf-8")


def canonical_text(value: Any) -> str:
    """Like canonical_json but returns str (callers choose the error handler of the UTF-8 step)."""
    if _fast_encode is not None:
        try:
            return "".join(_fast_encode(value, 0))
        except RecursionError:
            pass
    return _encode(value)


def loads(data: bytes | str) -> Any:
    """Decode JSON produced by canonical_json (anything else json.loads accepts gives the same result).

    orjson first where it gives the values json.loads gives (several times faster: a read-model snapshot is
    megabytes): UTF-8 bytes without a run of 19 digits (orjson turns an integer beyond 64 bits into a float, and
    such a run is where one could be). What it refuses (NaN, lone surrogates, deep nesting, ...) and the rest go
    to the standard decoder, which decides."""
    if type(data) is bytes and not may_have_long_int(data):
        try:
            return _orjson_loads(data)
        except _OrjsonError:
            pass
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        value, end = _scan_once(text, 0)
        if end == len(text):
            return value
    except (StopIteration, ValueError, AttributeError):
        pass
    return json.loads(data)  # not canonical: the general decoder decides (and raises what it raises)
