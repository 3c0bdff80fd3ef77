"""The seam between adapters (socket API, CLI) and the application: verbs in, replies out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Actor:
    """Who asked: from SO_PEERCRED for socket clients, a moldd user (API key) for signed CloudStack requests,
    or an internal actor such as ``system`` / ``ha``.

    ``role`` (``admin`` / ``operator`` / ``readonly``, see :mod:`moldd.domain.roles`) bounds what the actor
    may call; ``None`` (internal actors) is not checked. ``via="apikey"`` marks a moldd user authenticated
    by a signed request: ``user`` is then the moldd user name, not a Unix account."""

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    user: str | None = None
    internal: str | None = None
    role: str | None = None
    via: str | None = None

    def __str__(self) -> str:
        # asked for every command (the log context): kept once made (not a field: equality is unchanged)
        text: str | None = self.__dict__.get("_text")
        if text is None:
            text = self._describe()
            object.__setattr__(self, "_text", text)
        return text

    def _describe(self) -> str:
        if self.internal is not None:
            return self.internal
        if self.via is not None:
            return f"user={self.user} via={self.via} role={self.role}"
        who = f"uid={self.uid}" + (f"({self.user})" if self.user else "")
        return f"{who} gid={self.gid} pid={self.pid}"


SYSTEM = Actor(internal="system")
HA = Actor(internal="ha")


@dataclass(frozen=True)
class CommandReply:
    """``result`` is JSON-serialisable; ``position`` is the log position that records the command."""

    result: Any
    position: int


class CommandBus(Protocol):
    async def async_dispatch(
        self, verb: str, args: Mapping[str, Any], command_id: str | None, actor: Actor
    ) -> CommandReply:
        """Run one command; raises ``moldd.domain.errors.MolddError`` on refusal."""
        ...

    def verbs(self) -> list[str]: ...

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...details}``; ``ok`` turns false when a watcher or the log writer is down."""
        ...

    def async_follow(
        self, from_position: int, *, stream: str | None = None, correlation: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Log entries (as JSON-ready dicts) from ``from_position`` on, then live; only those of ``stream`` /
        ``correlation`` when given (the adapter filters again, so a bus may ignore them)."""
        ...
