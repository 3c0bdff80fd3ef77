"""Secrets never enter the append-only log: a secret setting is kept in a private file beside the database
(mode 0600, atomic replace), and the log (and so the read model, the API and every export) holds a marker
instead: ``{"secret": "set", "id": <keyed hash>}``. The id is an HMAC-SHA256 under a random key of that file,
so the audit trail still shows who set or changed a secret, and when, and whether two values were the same,
without the value (an unkeyed hash of an 8-character VNC password would be guessed).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets as _random
from pathlib import Path
from typing import Any

from moldd.config import Config

SECRET_DETAILS = frozenset({"vnc_password"})
"""The VM settings (details) that are secrets."""
FILE_NAME = "secrets.json"


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and value.get("secret") == "set" and isinstance(value.get("id"), str)


class SecretStore:
    """The values behind the markers, in ``<database dir>/secrets.json``. Small and rarely written: blocking
    file I/O of a few hundred bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_config(cls, config: Config) -> SecretStore:
        return cls(config.database.parent / FILE_NAME)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"hmac_key": _random.token_hex(32), "values": {}}
        if not isinstance(data, dict) or "hmac_key" not in data:
            raise ValueError(f"{self.path} is not a moldd secrets file")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        write_private_file(self.path, json.dumps(data, sort_keys=True).encode())

    def seal(self, value: str) -> dict[str, str]:
        """Keep `value`; return the marker the log records in its place."""
        data = self._load()
        digest = hmac.new(bytes.fromhex(data["hmac_key"]), value.encode(), hashlib.sha256).hexdigest()[:32]
        if data["values"].get(digest) != value:
            data["values"][digest] = value
            self._save(data)
        return {"secret": "set", "id": digest}

    def reveal(self, marker: Any) -> str | None:
        """The value behind a marker (None if unknown); a plain string is returned as is (a log written before
        secrets were kept out of it)."""
        if isinstance(marker, str):
            return marker
        if not is_marker(marker):
            return None
        value = self._load()["values"].get(marker["id"])
        return value if isinstance(value, str) else None


def protect_details(store: SecretStore, details: dict[str, Any]) -> dict[str, Any]:
    """`details` with every secret setting replaced by its marker (None, a removal, stays None)."""
    out = dict(details)
    for key in SECRET_DETAILS & out.keys():
        value = out[key]
        if isinstance(value, str):
            out[key] = store.seal(value)
    return out


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a file of mode 0600 holding ``data`` (whatever the umask), durably: the file
    and its directory are fsynced before this returns, so a crash leaves the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
