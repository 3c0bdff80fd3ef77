"""The three names of a VM (Mold manual): an immutable RFC 1123 VM name, a display name, a hostname."""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Callable, Collection

from moldd.domain.errors import Conflict, ValidationError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def is_rfc1123_label(name: str) -> bool:
    return bool(_LABEL.match(name))


def generate_vm_name(taken: Collection[str], *, token: Callable[[int], str] | None = None) -> str:
    """A new unique VM name such as ``k7q2x9c1``: eight lower-case letters and digits starting with a letter (an
    RFC 1123 label that is also a valid hostname), never reused. No ``vm-`` prefix: the VM's log stream is
    already ``vm-<name>``, so it reads ``vm-k7q2x9c1``, not ``vm-vm-…``."""
    pick = token or (lambda n: "".join(secrets.choice(_ALPHABET) for _ in range(n)))
    for _ in range(100):
        name = pick(8)
        name = secrets.choice(_LETTERS) + name[1:] if name[:1] not in _LETTERS else name
        if name not in taken and is_rfc1123_label(name):
            return name
    raise Conflict("could not find a free VM name", field="name")


def validate_hostname(value: object, *, field: str = "hostname") -> str:
    """A DHCP hostname: a DNS label of 1-63 characters, letters, digits and '-', no leading digit.

    Returned lower-cased (DNS names are case-insensitive)."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    name = value.lower()
    if not 1 <= len(name) <= 63:
        raise ValidationError(f"{field} must be 1-63 characters long, got {len(name)}", field=field)
    if name[0].isdigit():
        raise ValidationError(f"{field} {value!r} must not start with a digit", field=field)
    if not _HOSTNAME.match(name):
        raise ValidationError(
            f"{field} {value!r} is not a DNS label: use letters, digits and '-', not starting or ending with '-'",
            field=field,
        )
    return name


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def _unsafe(c: str) -> bool:
    o = ord(c)
    return unicodedata.category(c) in _UNSAFE_CATEGORIES or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def unsafe_characters(text: str) -> list[str]:
    """Control, format (bidi overrides such as U+202E, zero-width...), line/paragraph separator, surrogate,
    private-use and non-character code points of `text`, as U+XXXX: what may spoof or garble a human reading
    a name or an id in a table or an audit trail."""
    if text.isascii() and text.isprintable():
        return []  # the common case without a per-character loop: in ASCII only Cc (< 0x20, 0x7F) is unsafe
    return [f"U+{ord(c):04X}" for c in text if _unsafe(c)]


def check_safe_text(value: str, field: str) -> str:
    """Refuse a name or an id holding an unsafe character (see unsafe_characters)."""
    bad = unsafe_characters(value)
    if bad:
        raise ValidationError(
            f"{field} must not contain control or format characters (found {', '.join(sorted(set(bad)))})",
            field=field,
        )
    return value


def escape_unsafe(text: str) -> str:
    """`text` for a human: each unsafe character (see unsafe_characters) shown as \\uXXXX, so what is printed is
    what is stored (no right-to-left override, no hidden characters)."""
    if not any(_unsafe(c) for c in text):
        return text
    return "".join((f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}") if _unsafe(c) else c for c in text)


def validate_display_name(value: object, *, field: str = "displayname") -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    text = value.strip()
    if not 1 <= len(text) <= 255:
        raise ValidationError(f"{field} must be 1-255 characters long", field=field)
    # (also: surrogates and U+FFFE/U+FFFF cannot go into the libvirt domain XML the display name is written to)
    return check_safe_text(text, field)


def validate_group_name(value: object, *, field: str = "group") -> str:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$", value):
        raise ValidationError(
            f"{field} must be 1-63 characters: letters, digits, space, '.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return value


def internal_name(
    pattern: str, *, account: str, vm_id: int, instance: str, display_name: str, append_display_name: bool
) -> str:
    """The libvirt domain name, e.g. CloudStack's ``i-<account>-<id>-<instance>``.

    With ``append_display_name`` (the manual's "add display name to internal name") the display name, reduced to
    a DNS-safe label, is appended. Computed once at deploy and stable for the VM's life."""
    name = pattern.format(account=account, id=vm_id, instance=instance)
    if append_display_name:
        tail = re.sub(r"[^a-z0-9-]+", "-", display_name.lower()).strip("-")
        if tail:
            name = f"{name}-{tail}"
    return name[:200]
