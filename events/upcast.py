"""Upcasting: old payloads are converted at read time, step by step, to the current schema version.

Old rows are never rewritten. The registry also declares the known event types and their current
schema versions, which `verify` uses to report unknown types and versions from the future.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Payload = dict[str, Any]
UpcastFn = Callable[[Payload], Payload]


class Upcasters:
    """Registry of (event_type, from_schema_version) -> function(payload) -> payload (to version + 1)."""

    def __init__(self) -> None:
        self._fns: dict[tuple[str, int], UpcastFn] = {}
        self._current: dict[str, int] = {}

    def declare(self, event_type: str, current_version: int = 1) -> None:
        """Declare a known event type and the schema version the application writes and reads."""
        if current_version < 1:
            raise ValueError("schema versions start at 1")
        self._current[event_type] = max(current_version, self._current.get(event_type, 1))

    def declare_many(self, types: Mapping[str, int]) -> None:
        for event_type, version in types.items():
            self.declare(event_type, version)

    def register(self, event_type: str, from_version: int, fn: UpcastFn) -> None:
        """Register the step from `from_version` to `from_version + 1` (declares the type as known)."""
        if (event_type, from_version) in self._fns:
            raise ValueError(f"an upcaster for {event_type!r} v{from_version} is already registered")
        self._fns[(event_type, from_version)] = fn
        self.declare(event_type, from_version + 1)

    def upcaster(self, event_type: str, from_version: int) -> Callable[[UpcastFn], UpcastFn]:
        """Decorator form of `register`."""

        def deco(fn: UpcastFn) -> UpcastFn:
            self.register(event_type, from_version, fn)
            return fn

        return deco

    def current_version(self, event_type: str) -> int | None:
        return self._current.get(event_type)

    @property
    def known(self) -> Mapping[str, int]:
        """event_type -> current schema version."""
        return dict(self._current)

    def needs_upcast(self, event_type: str, schema_version: int) -> bool:
        current = self._current.get(event_type)
        return current is not None and schema_version < current

    def upcast(self, event_type: str, schema_version: int, payload: Payload) -> tuple[int, Payload]:
        """Apply the chain of steps from `schema_version` up to the current version.

        A missing step leaves the payload at the last version reached (never guesses).
        """
        current = self._current.get(event_type)
        if current is None:
            return schema_version, payload
        version = schema_version
        while version < current:
            fn = self._fns.get((event_type, version))
            if fn is None:
                break
            payload = fn(payload)
            version += 1
        return version, payload


KnownTypes = Upcasters | Mapping[str, int]


def known_versions(known: KnownTypes | None) -> Mapping[str, int] | None:
    """Normalise a registry or a plain mapping to event_type -> current schema version."""
    if known is None:
        return None
    if isinstance(known, Upcasters):
        return known.known
    return dict(known)
