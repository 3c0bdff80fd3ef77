"""moldd users: a role and a CloudStack API key pair each. createUser, listUsers, registerUserKeys, revokeUser.

The log records each user's id, role, API key and the SHA-256 of the secret key; the secret itself lives only
in a separate file (:class:`SecretStore`, mode 0600) — on a PostgreSQL log, in the shared table of
moldd.cluster_secrets, so that every node can check a signature — because a signature check needs it in clear
and the log must never hold it. A secret whose digest does not match the log's is refused, so the file cannot be used to
slip in a key the log did not record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from events import NO_STREAM, NewEvent
from moldd.app.args import Args
from moldd.app.bus import CommandReply
from moldd.app.secrets import write_private_file
from moldd.app.service import App, Command, verb
from moldd.config import Config
from moldd.domain.errors import Conflict, NotFound, ValidationError
from moldd.domain.roles import Role

if TYPE_CHECKING:
    from moldd.cluster_secrets import SharedSecrets

log = structlog.get_logger("moldd.users")

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secrets_path(config: Config) -> Path:
    return config.cloudstack.secrets_file or config.database.parent / "api-secrets.json"


class SecretStore:
    """API key → secret key, in one JSON file of mode 0600, replaced atomically on every change."""

    def __init__(self, path: Path, shared: SharedSecrets | None = None) -> None:
        self.path = path
        self.shared = shared  # a cluster: the secrets are in PostgreSQL (moldd.cluster_secrets), not in the file
        self._secrets: dict[str, str] | None = None
        self._lock = asyncio.Lock()

    def replace(self, secrets: dict[str, str]) -> None:
        """The shared table's content (a cluster node loads it at start, when elected, after a user.* event)."""
        self._secrets = dict(secrets)

    def _load(self) -> dict[str, str]:
        if self._secrets is None and self.shared is not None:
            return {}  # not loaded yet: nothing is known
        if self._secrets is None:
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                data = {}
            except (OSError, ValueError) as exc:
                log.error("secrets_file_unreadable", path=str(self.path), error=str(exc))
                data = {}
            self._secrets = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        return self._secrets

    def get(self, apikey: str) -> str | None:
        return self._load().get(apikey)

    def _write(self, data: dict[str, str]) -> None:
        write_private_file(self.path, json.dumps(data, indent=0, sort_keys=True).encode())

    async def async_change(self, add: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> None:
        async with self._lock:
            data = dict(self._load())
            data.update(add or {})
            for key in remove:
                data.pop(key, None)
            if self.shared is not None:
                from moldd.cluster_secrets import API

                await self.shared.async_put(API, add or {})
                await self.shared.async_delete(API, remove)
            else:
                await asyncio.to_thread(self._write, data)
            self._secrets = data


@dataclass(frozen=True)
class ApiUser:
    name: str
    id: str
    role: str
    apikey: str
    secret: str


class UserDirectory:
    """What the CloudStack endpoint asks: who holds this API key, and what is its secret."""

    def __init__(self, app: App, store: SecretStore) -> None:
        self.app = app
        self.store = store

    def lookup(self, apikey: str) -> ApiUser | None:
        name = self.app.model.by_apikey.get(apikey)
        user = self.app.model.users.get(name) if name else None
        if user is None or user.get("state") != "enabled":
            return None
        secret = self.store.get(apikey)
        if secret is None:
            log.warning("api_secret_missing", user=name)
            return None
        if not secrets.compare_digest(secret_digest(secret), user["key_fingerprint"]):
            log.error("api_secret_mismatch", user=name, hint="the secrets file does not match the log")
            return None
        return ApiUser(name=user["name"], id=user["id"], role=user["role"], apikey=apikey, secret=secret)


def directory(app: App) -> UserDirectory:
    """The app's user directory (one secret store per app; in a cluster moldd.cluster installs one whose secrets
    are in PostgreSQL)."""
    found: UserDirectory | None = getattr(app, "user_directory", None)
    if found is None:
        found = UserDirectory(app, SecretStore(secrets_path(app.config)))
        app.user_directory = found  # type: ignore[attr-defined]
    return found


def _view(user: dict[str, Any]) -> dict[str, Any]:
    return {k: user[k] for k in ("name", "id", "role", "apikey", "state", "created", "updated")}


def _new_keys() -> tuple[str, str]:
    # CloudStack's keys are 86 characters of URL-safe base64 (64 random bytes); so are these.
    return secrets.token_urlsafe(64), secrets.token_urlsafe(64)


def _user_name(a: Args) -> str:
    name = a.text("username", max_len=64)
    if not _USER_NAME.match(name):
        raise ValidationError(
            "username must be 1-64 characters: letters, digits, '.', '_', '@' or '-', starting with a letter "
            "or digit",
            field="username",
        )
    return str(name)


async def _async_append_user(app: App, cmd: Command, name: str, event: str, payload: dict[str, Any]) -> int:
    stream = f"user-{name}"
    current = await app.store.async_read_stream(stream)
    version = current[-1].stream_version if current else NO_STREAM
    ev = NewEvent(event, payload, actor=str(cmd.actor), causation_id=cmd.id)
    res = await app.async_append(stream, [ev], expected_version=version, command_id=cmd.id)
    return res.last_position


@verb("createUser")
async def create_user(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"username", "role"}, {"name": "username", "user": "username", "roletype": "role"})
    name = _user_name(a)
    role = Role.parse(a.text("role", "readonly"))
    users = directory(app)
    async with app.claim(f"user-{name}"):
        if name in app.model.users:
            raise Conflict(f"user {name!r} already exists (revoked users keep their name)", field="username")
        apikey, secret = _new_keys()
        # The secret reaches the disk before the log says the key exists: a key the log knows always works.
        await users.store.async_change(add={apikey: secret})
        payload = {
            "name": name, "id": str(uuid.uuid4()), "role": str(role), "apikey": apikey,
            "key_fingerprint": secret_digest(secret),
        }  # fmt: skip
        try:
            position = await _async_append_user(app, cmd, name, "user.created", payload)
        except BaseException:
            await users.store.async_change(remove=(apikey,))
            raise
    log.info("user_created", user=name, role=str(role))
    return CommandReply(
        result={"user": _view(app.model.users[name]) | {"secretkey": secret}}, position=position
    )


@verb("listUsers")
async def list_users(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"username", "state"}, {"name": "username"})
    name, state = a.text("username", None), a.text("state", None)
    users = [
        _view(u)
        for u in sorted(app.model.users.values(), key=lambda u: u["name"])
        if (name is None or u["name"] == name) and (state is None or u["state"] == state)
    ]
    return CommandReply(result={"count": len(users), "user": users}, position=app.model.position)


def _existing(app: App, name: str) -> dict[str, Any]:
    user = app.model.users.get(name)
    if user is None:
        known = ", ".join(sorted(app.model.users)) or "none"
        raise NotFound(f"no user {name!r} (known: {known})", field="username")
    return user


@verb("registerUserKeys")
async def register_keys(app: App, cmd: Command) -> CommandReply:
    """A new API key pair for a user (the old one stops working); also re-enables a revoked user."""
    a = Args(cmd.args, {"username"}, {"name": "username", "id": "username", "user": "username"})
    name = _user_name(a)
    users = directory(app)
    async with app.claim(f"user-{name}"):
        old = _existing(app, name)["apikey"]
        apikey, secret = _new_keys()
        await users.store.async_change(add={apikey: secret})
        try:
            position = await _async_append_user(
                app, cmd, name, "user.keys.registered",
                {"name": name, "apikey": apikey, "key_fingerprint": secret_digest(secret)},
            )  # fmt: skip
        except BaseException:
            await users.store.async_change(remove=(apikey,))
            raise
        await users.store.async_change(remove=(old,))
    log.info("user_keys_registered", user=name)
    return CommandReply(
        result={"userkeys": {"apikey": apikey, "secretkey": secret}, "user": _view(app.model.users[name])},
        position=position,
    )


@verb("revokeUser")
async def revoke_user(app: App, cmd: Command) -> CommandReply:
    """The user's API key stops working at once; the user (and its history) stays in the log."""
    a = Args(cmd.args, {"username", "reason"}, {"name": "username", "id": "username", "user": "username"})
    name = _user_name(a)
    reason = a.text("reason", "", max_len=1024) if "reason" in a else ""
    users = directory(app)
    async with app.claim(f"user-{name}"):
        user = _existing(app, name)
        if user["state"] == "revoked":
            return CommandReply(result={"user": _view(user)}, position=app.model.position)
        position = await _async_append_user(app, cmd, name, "user.revoked", {"name": name, "reason": reason})
        await users.store.async_change(remove=(user["apikey"],))
    log.info("user_revoked", user=name)
    return CommandReply(result={"user": _view(app.model.users[name])}, position=position)
