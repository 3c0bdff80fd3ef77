"""Secrets never enter the append-only log: a secret setting is kept in a private file beside the database
(mode 0600, atomic replace) — on a PostgreSQL log in a table every node reads (moldd.cluster_secrets) —
and the log (and so the read model, the API and every export) holds a marker
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
from typing import TYPE_CHECKING, Any

from moldd.config import Config

if TYPE_CHECKING:
    from moldd.cluster_secrets import SharedSecrets

SECRET_DETAILS = frozenset({"vnc_password"})
"""The VM settings (details) that are secrets."""
FILE_NAME = "secrets.json"
_SHARED: dict[tuple[str, str], SecretStore] = {}  # (dsn, schema) -> the cluster node's store


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and value.get("secret") == "set" and isinstance(value.get("id"), str)


class SecretStore:
    """The values behind the markers, in ``<database dir>/secrets.json``. Small and rarely written: blocking
    file I/O of a few hundred bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # a cluster (moldd.cluster_secrets): the values are in PostgreSQL; this is their copy in memory, and
        # `pending` what was sealed since the last flush (App.async_append flushes before it appends)
        self.shared: SharedSecrets | None = None
        self._memory: dict[str, Any] | None = None
        self.pending: dict[str, str] = {}

    @classmethod
    def for_config(cls, config: Config) -> SecretStore:
        if config.database_dsn is not None:
            found = _SHARED.get((config.database_dsn, config.cluster.schema))
            if found is not None:
                return found
        return cls(config.database.parent / FILE_NAME)

    @classmethod
    def shared_for(cls, config: Config, shared: SharedSecrets) -> SecretStore:
        """The store of a cluster node (registered: for_config(config) returns it until `unregister`)."""
        store = cls(config.database.parent / FILE_NAME)
        store.shared = shared
        _SHARED[(str(config.database_dsn), config.cluster.schema)] = store
        return store

    def unregister(self, config: Config) -> None:
        key = (str(config.database_dsn), config.cluster.schema)
        if _SHARED.get(key) is self:
            del _SHARED[key]

    def replace(self, hmac_key: str, values: dict[str, str]) -> None:
        """The shared table's content (loaded at start and when elected)."""
        self._memory = {"hmac_key": hmac_key, "values": {**values, **self.pending}}

    async def async_flush(self) -> None:
        """Values sealed since the last flush reach the shared table (before the event that names them)."""
        if self.shared is None or not self.pending:
            return
        from moldd.cluster_secrets import SETTINGS

        pending = dict(self.pending)
        await self.shared.async_put(SETTINGS, pending)
        for key in pending:
            self.pending.pop(key, None)

    def _load(self) -> dict[str, Any]:
        if self.shared is not None:
            if self._memory is None:
                raise RuntimeError("the shared secrets are not loaded yet")
            return self._memory
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
            if self.shared is not None:
                self.pending[digest] = value  # in memory already (data is it); flushed before the append
            else:
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
