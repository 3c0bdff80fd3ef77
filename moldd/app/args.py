"""Typed access to a command's ``args``: every refusal names the field and says why; unknown keys are refused."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moldd.domain.errors import ValidationError

_MISSING: Any = object()

VM_ALIASES = {"virtualmachineid": "id", "vm": "id", "name": "id"}
"""The names CloudStack clients (and moldctl) use for "the VM this command is about"."""


class Args:
    def __init__(
        self, raw: Mapping[str, Any], known: set[str], aliases: Mapping[str, str] | None = None
    ) -> None:
        if not isinstance(raw, Mapping):
            raise ValidationError("args must be a JSON object", field="args")
        aliases = aliases or {}
        self._values: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = aliases.get(key.lower(), key.lower()) if isinstance(key, str) else key
            if canonical not in known:
                allowed = ", ".join(sorted(known))
                raise ValidationError(
                    f"unknown argument {key!r} (this command takes: {allowed})", field=str(key)
                )
            if canonical in self._values:
                raise ValidationError(f"argument {key!r} given twice (also as an alias)", field=str(key))
            self._values[canonical] = value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def keys(self) -> set[str]:
        return set(self._values)

    def raw(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def _given(self, key: str, default: Any) -> tuple[bool, Any]:
        """(True, value) when the client gave ``key`` (null counts as not given); else (False, default), or a
        refusal naming the field when there is no default."""
        value = self._values.get(key)
        if value is None:
            if default is _MISSING:
                raise ValidationError(f"{key} is required", field=key)
            return False, default
        return True, value

    def text(self, key: str, default: Any = _MISSING, *, max_len: int = 255, multiline: bool = False) -> Any:
        """A non-empty string of at most ``max_len`` characters, without control characters (``multiline``
        allows tab and newline)."""
        given, value = self._given(key, default)
        if not given:
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f"{key} must be a non-empty string, got {show(value)}", field=key)
        if len(value) > max_len:
            raise ValidationError(
                f"{key} must be at most {max_len} characters, got {len(value)}", field=key
            )
        check_no_controls(key, value, multiline=multiline)
        return value

    def integer(self, key: str, default: Any = _MISSING, *, min: int, max: int) -> Any:
        """An integer within ``min``..``max``: a JSON integer, or a string of ASCII digits (an optional ``-``
        first) — not a float, a boolean, Unicode digits or ``"--5"``."""
        given, value = self._given(key, default)
        if not given:
            return value
        return parse_int(key, value, min=min, max=max)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValidationError(f"{key} must be true or false, got {show(value)}", field=key)
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if not isinstance(value, Mapping):
            raise ValidationError(f"{key} must be a JSON object, got {show(value)}", field=key)
        return dict(value)


MAX_POSITION = 2**63 - 1  # a log position (SQLite INTEGER)

_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


def parse_int(key: str, value: Any, *, min: int, max: int) -> int:
    """``value`` as an integer within ``min``..``max``, or a refusal naming ``key`` and the range."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{key} must be an integer from {min} to {max}, got {show(value)}", field=key)
    if not min <= value <= max:
        raise ValidationError(f"{key} must be an integer from {min} to {max}, got {show(value)}", field=key)
    return value


def check_no_controls(key: str, value: str, *, multiline: bool = False) -> None:
    if value.isascii() and value.isprintable():
        return  # the common case without a per-character loop (in ASCII only < 0x20 and 0x7F are controls)
    allowed = "\t\n\r" if multiline else ""
    bad = next((c for c in value if (ord(c) < 32 or 127 <= ord(c) < 160) and c not in allowed), None)
    if bad is not None:
        raise ValidationError(f"{key} must not contain control characters (found {bad!r})", field=key)


def show(value: Any, limit: int = 40) -> str:
    """A short ``repr`` for messages: a 10 kB argument is not echoed back whole."""
    text = repr(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool) and len(text) > limit:
        return f"{text[:limit]}… ({len(str(value))} characters)"
    return text if len(text) <= limit else f"{text[:limit]}…"
