"""Stable UUIDs for objects named in the configuration (zones, hosts, templates, ...), as CloudStack clients
expect ids to be. A VM's UUID is drawn at deploy and recorded in the log; a configured object's UUID is
derived from its kind and name (UUID v5), so it is the same on every daemon and every restart, and changes
only when the object is renamed."""

from __future__ import annotations

import os
import uuid

NAMESPACE = uuid.UUID("6d6f6c64-642d-4373-a000-000000000001")  # "moldd-Cs" — fixed for ever


def stable_uuid(kind: str, name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{kind}:{name}"))


def is_uuid(text: object) -> bool:
    if not isinstance(text, str) or len(text) != 36:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def new_hex_id() -> str:
    """``uuid.uuid4().hex`` without building a ``UUID`` object (asked for every command): 16 random bytes with
    the version-4 and RFC 4122 variant bits set, as 32 hex digits."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()
