"""Typed access to a command's ``args``: every refusal names the field and says why; unknown keys are refused."""

from __future__ import annotations

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

    def text(self, key: str, default: Any = _MISSING, *, max_len: int = 255) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f"{key} must be a non-empty string", field=key)
        if len(value) > max_len:
            raise ValidationError(f"{key} must be at most {max_len} characters", field=key)
        return value

    def integer(
        self, key: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"{key} must be an integer, got {value!r}", field=key)
        if min is not None and value < min:
            raise ValidationError(f"{key} must be at least {min}, got {value}", field=key)
        if max is not None and value > max:
            raise ValidationError(f"{key} must be at most {max}, got {value}", field=key)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValidationError(f"{key} must be true or false, got {value!r}", field=key)
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> Any:
        given, value = self._given(key, default)
        if not given:
            return value
        if not isinstance(value, Mapping):
            raise ValidationError(f"{key} must be a JSON object", field=key)
        return dict(value)
