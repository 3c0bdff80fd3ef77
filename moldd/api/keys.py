"""Typed keys for the aiohttp application and request state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from moldd.api.peercred import AccessPolicy
from moldd.app.bus import Actor, CommandBus


@dataclass(frozen=True)
class ApiSettings:
    """Tunables of the socket API (not of the application)."""

    heartbeat_s: float = 10.0  # an idle event stream sends ``{"heartbeat": ...}`` this often
    max_body_bytes: int = 1_048_576
    # An event stream whose client has not taken a line for this long (a stopped or wedged reader) is
    # ended, so it does not hold a handler and a log subscription for ever.
    write_timeout_s: float = 30.0


BUS_KEY = web.AppKey("moldd.bus", CommandBus)
ACCESS_KEY = web.AppKey("moldd.access", AccessPolicy)
SETTINGS_KEY = web.AppKey("moldd.settings", ApiSettings)
# Set by on_shutdown so open event streams end instead of holding the shutdown for their timeout.
CLOSING_KEY = web.AppKey("moldd.closing", asyncio.Event)
ACTOR_KEY = web.RequestKey("moldd.actor", Actor)
