"""CloudStack's request signature, as its ApiServer checks it. Pure functions, no I/O.

The string to sign is every parameter but ``signature``, sorted by name (as sent, case-sensitive), each as
``name=value`` with the value URL-encoded the way Java's ``URLEncoder`` does (``+`` for a space becomes
``%20``), joined with ``&`` and lower-cased as a whole. The signature is the Base64 HMAC-SHA1 of that with the
user's secret key. With ``signatureversion=3`` the request also carries ``expires``
(``yyyy-MM-ddTHH:mm:ssZ``) and is refused once that moment has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

# Java's URLEncoder leaves letters, digits and ". - * _" alone; everything else is %XX (UTF-8), space is "+".
_JAVA_SAFE = "-_.*"


class SignatureError(Exception):
    """Why a request's signature or expiry was refused (logged; the client only hears 401)."""


def java_urlencode(value: str) -> str:
    """``java.net.URLEncoder.encode(value, "UTF-8").replace("+", "%20")``."""
    return quote(value, safe=_JAVA_SAFE).replace("~", "%7E")


def string_to_sign(params: Mapping[str, str], *, encode: bool = True) -> str:
    parts = []
    for name in sorted(params):
        if name.lower() == "signature":
            continue
        value = params[name]
        parts.append(f"{name}={java_urlencode(value) if encode else value}")
    return "&".join(parts).lower()


def sign(params: Mapping[str, str], secret: str) -> str:
    digest = hmac.new(secret.encode(), string_to_sign(params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _candidates(params: Mapping[str, str]) -> list[str]:
    """The strings a correct client may have signed. CloudStack's own (Java's encoder) first; then the two
    variants real clients compute, which CloudStack servers accept in practice because they differ only
    where values hold ``~`` (``cs``: ``quote(v, safe="*")``) or ``[]`` and names sort differently once
    lower-cased (Libcloud: names lower-cased before sorting, ``quote(v, safe="[]*")``)."""
    names = [n for n in params if n.lower() != "signature"]
    found = [string_to_sign(params)]
    for order, safe in ((sorted(names), "*"), (sorted(names, key=str.lower), "[]*")):
        text = "&".join(f"{n}={quote(params[n], safe=safe)}" for n in order).lower()
        if text not in found:
            found.append(text)
    return found


def signature_matches(params: Mapping[str, str], secret: str, given: str) -> bool:
    """Timing-safe comparison of ``given`` with the signature(s) CloudStack would compute."""
    ok = False
    for text in _candidates(params):
        expected = base64.b64encode(hmac.new(secret.encode(), text.encode(), hashlib.sha1).digest())
        ok |= hmac.compare_digest(expected, given.encode("utf-8", "replace"))
    return ok


EXPIRES_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z")


def parse_expires(text: str) -> datetime:
    """CloudStack's ``expires`` (``2026-11-30T18:00:00+0000``; ``Z`` and ``+00:00`` are taken too)."""
    cleaned = text.strip()
    if cleaned.endswith("Z"):
        cleaned = cleaned[:-1] + "+0000"
    for fmt in EXPIRES_FORMATS:
        try:
            at = datetime.strptime(cleaned, fmt)
        except ValueError:
            continue
        if at.tzinfo is None:
            continue
        return at.astimezone(UTC)
    raise SignatureError(f"expires {text[:40]!r} is not a time like 2026-01-31T12:00:00+0000")


def check_expiry(
    params: Mapping[str, str], now: datetime, *, max_ahead: timedelta, require: bool = False
) -> None:
    """Refuse an expired request, or one whose ``expires`` lies further ahead than ``max_ahead`` (it could be
    replayed for that long). Without ``signatureversion=3`` there is no expiry (as in CloudStack) unless
    ``require``."""
    lower = {k.lower(): v for k, v in params.items()}
    version, expires = lower.get("signatureversion"), lower.get("expires")
    if version is None and expires is None:
        if require:
            raise SignatureError("this endpoint needs signatureversion=3 and expires")
        return
    if version != "3":
        raise SignatureError(f"signatureversion {str(version)[:10]!r} is not supported (only 3)")
    if expires is None:
        raise SignatureError("signatureversion=3 needs expires")
    at = parse_expires(expires)
    if at < now:
        raise SignatureError(f"the request expired at {at.isoformat()}")
    if at > now + max_ahead:
        raise SignatureError(f"expires {at.isoformat()} is more than {max_ahead} ahead")
