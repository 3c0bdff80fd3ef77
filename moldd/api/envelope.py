"""The command envelope of ``POST /v1/command`` and the query of ``GET /v1/events``: parsing only.

``{"command": "<verb>", "args": {...}, "id": "<optional client command id>"}``. Every refusal is a
:class:`~moldd.domain.errors.ValidationError` naming the field at fault.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from moldd.domain.errors import ValidationError
from moldd.domain.names import check_safe_text

MAX_COMMAND_ID_LEN = 128
MAX_POSITION = 2**63 - 1  # SQLite INTEGER


class UnknownCommand(ValidationError):
    code = "unknown_command"


@dataclass(frozen=True)
class CommandEnvelope:
    verb: str
    args: Mapping[str, Any] = field(default_factory=dict)
    command_id: str | None = None


_ENVELOPE_KEYS = frozenset({"command", "args", "id"})


def parse_command(body: Any, verbs: Collection[str]) -> CommandEnvelope:
    """Check the decoded JSON body of a command request against the bus's verbs."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", field="body")
    unknown = [] if body.keys() <= _ENVELOPE_KEYS else sorted(set(body) - _ENVELOPE_KEYS)
    if unknown:
        raise ValidationError(
            f"unexpected key {unknown[0]!r} in the request; allowed: command, args, id", field=unknown[0]
        )
    verb = body.get("command")
    if not isinstance(verb, str) or not verb:
        raise ValidationError('"command" must be a non-empty string naming a verb', field="command")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValidationError('"args" must be a JSON object', field="args")
    command_id = body.get("id")
    if command_id is not None and (
        not isinstance(command_id, str) or not 1 <= len(command_id) <= MAX_COMMAND_ID_LEN
    ):
        raise ValidationError(f'"id" must be a string of 1 to {MAX_COMMAND_ID_LEN} characters', field="id")
    if command_id is not None:
        check_safe_text(command_id, "id")
    if command_id is not None and (
        not command_id.strip() or command_id != command_id.strip()
    ):
        raise ValidationError(
            '"id" must be printable text without control characters or surrounding spaces', field="id"
        )
    if verb not in verbs:
        raise unknown_command(verb, verbs)
    return CommandEnvelope(verb=verb, args=args, command_id=command_id)


def unknown_command(verb: str, verbs: Collection[str]) -> UnknownCommand:
    """The refusal for a verb the bus does not know, listing close matches (case-insensitive)."""
    by_lower = {v.lower(): v for v in verbs}
    close = [by_lower[m] for m in difflib.get_close_matches(verb.lower(), list(by_lower), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownCommand(f"unknown command {verb!r}{hint}", field="command")


@dataclass(frozen=True)
class EventsQuery:
    """``GET /v1/events?from=<position>&stream=<id>&correlation=<id>``."""

    from_position: int = 1
    stream: str | None = None
    correlation: str | None = None

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if self.stream is not None and entry.get("stream_id") != self.stream:
            return False
        # The ``*.requested`` event records the job id as its command_id; its outcomes carry it as
        # correlation_id. Following a job means seeing both.
        return self.correlation is None or self.correlation in (
            entry.get("correlation_id"),
            entry.get("command_id"),
        )


def parse_events_query(query: Mapping[str, str]) -> EventsQuery:
    unknown = sorted(set(query) - {"from", "stream", "correlation"})
    if unknown:
        raise ValidationError(
            f"unexpected query parameter {unknown[0]!r}; allowed: from, stream, correlation", field=unknown[0]
        )
    raw_from = query.get("from", "1")
    # Plain digits only (int() would take "1_000" and " 5"), and within SQLite's INTEGER range.
    from_position = int(raw_from) if raw_from.isascii() and raw_from.isdigit() else -1
    if not 0 <= from_position <= MAX_POSITION:
        raise ValidationError(
            f'"from" must be a log position (an integer from 0 to {MAX_POSITION}), not {raw_from[:40]!r}',
            field="from",
        )
    stream = query.get("stream") or None
    correlation = query.get("correlation") or None
    return EventsQuery(from_position=max(from_position, 1), stream=stream, correlation=correlation)
