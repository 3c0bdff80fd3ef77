"""The secrets of a moldd cluster (API secret keys, secret VM settings), shared by every node through PostgreSQL.

On a single node they live in two private files beside the SQLite log (moldd.app.users, moldd.app.secrets). On
a PostgreSQL log each node may run on another machine and any of them may take over, so the files would leave a
new leader unable to check a signed request or to give a VM back its VNC password. They are kept instead in one
table of the log's schema, ``moldd_secrets``, that is NOT part of the log: no hash chain covers it, ``export``,
``copy`` and ``verify`` never read it, and the log's rows keep holding only markers and digests. Every node
loads it at start (so a standby checks signed read requests), again when it is elected (before it acts), and
again whenever it folds a ``user.*`` event (the leader writes a secret before the event that names it).

The daemon's role needs SELECT, INSERT and DELETE on it; the table is created at the first start if the role
may, otherwise the start is refused with the statements to run (README, "Running two or more management nodes").
An existing single-node installation keeps its secrets: a kind that has no row yet is seeded from the local files
the node would have used (``cloudstack.secrets_file`` and ``secrets.json`` beside ``daemon.database``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from events.postgres import quote_ident

log = structlog.get_logger("moldd.secrets")

TABLE = "moldd_secrets"
API = "api"  # API key -> secret key
SETTINGS = "settings"  # marker id -> value
SETTINGS_KEY = "settings-key"  # one row, HMAC_KEY -> the key of the settings' markers (the first node's)
HMAC_KEY = "hmac_key"
KINDS = (API, SETTINGS, SETTINGS_KEY)


class SecretsTableMissing(RuntimeError):
    """The table is missing and this role may not create it: the operator's statements are in the message."""


def create_statements(schema: str, role: str = "<the daemon's role>") -> list[str]:
    s = quote_ident(schema)
    return [
        f"CREATE TABLE {s}.{TABLE} (kind text NOT NULL, key text NOT NULL, value text NOT NULL, "
        "PRIMARY KEY (kind, key))",
        f"REVOKE ALL ON {s}.{TABLE} FROM PUBLIC",
        f"GRANT SELECT, INSERT, DELETE ON {s}.{TABLE} TO {role}",
    ]


class SharedSecrets:
    """The ``moldd_secrets`` table of one log's schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool: asyncpg.Pool | None = None
        self._table = f"{quote_ident(schema)}.{TABLE}"

    async def async_open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=2, server_settings={"application_name": "moldd-secrets"}
        )
        async with self._pool.acquire() as conn:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(self.schema)}.{TABLE}")
            if exists:
                return
            try:
                create, revoke = create_statements(self.schema)[:2]
                async with conn.transaction():
                    await conn.execute(create.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
                    await conn.execute(revoke)
            except asyncpg.InsufficientPrivilegeError as exc:
                user = await conn.fetchval("SELECT current_user")
                sql = ";\n  ".join(create_statements(self.schema, quote_ident(str(user))))
                raise SecretsTableMissing(
                    f"the shared secrets table {self.schema}.{TABLE} is missing and role {user} may not create it "
                    f"({exc}); as the schema's owner run:\n  {sql};"
                ) from None

    async def async_close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the shared secrets are not open")
        return self._pool

    async def async_load(self) -> dict[str, dict[str, str]]:
        rows = await self._p().fetch(f"SELECT kind, key, value FROM {self._table}")
        out: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        for kind, key, value in rows:
            out.setdefault(kind, {})[key] = value
        return out

    async def async_put(self, kind: str, items: dict[str, str]) -> None:
        """Insert `items`; an existing row wins. A key never takes a second value: an API key is 64 random bytes,
        a setting's id is the HMAC of its value, and the settings' HMAC key is set once (the first writer's)."""
        if items:
            await self._p().executemany(
                f"INSERT INTO {self._table} (kind, key, value) VALUES ($1, $2, $3) ON CONFLICT (kind, key) DO NOTHING",
                [(kind, k, v) for k, v in items.items()],
            )

    async def async_delete(self, kind: str, keys: tuple[str, ...]) -> None:
        if keys:
            await self._p().execute(
                f"DELETE FROM {self._table} WHERE kind = $1 AND key = ANY($2::text[])", kind, list(keys)
            )

    async def async_seed(self, local: dict[str, dict[str, str]]) -> dict[str, int]:
        """Each kind that has no row yet gets this node's local secrets (a single node moving to PostgreSQL)."""
        have = await self.async_load()
        seeded: dict[str, int] = {}
        for kind in KINDS:
            items = local.get(kind) or {}
            if items and not have.get(kind):
                await self.async_put(kind, items)
                seeded[kind] = len(items)
        if seeded:
            log.warning("secrets_seeded_from_local_files", **seeded)
        return seeded


def local_secrets(api_file: Path, settings_file: Path) -> dict[str, dict[str, str]]:
    """This node's secret files as the table's kinds (missing or unreadable files: nothing)."""
    out: dict[str, dict[str, str]] = {k: {} for k in KINDS}
    try:
        api: Any = json.loads(api_file.read_text())
        if isinstance(api, dict):
            out[API] = {k: v for k, v in api.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError):
        pass
    try:
        data: Any = json.loads(settings_file.read_text())
        if isinstance(data, dict) and isinstance(data.get("hmac_key"), str):
            values = data.get("values")
            values = values if isinstance(values, dict) else {}
            out[SETTINGS] = {k: v for k, v in values.items() if isinstance(k, str) and isinstance(v, str)}
            out[SETTINGS_KEY] = {HMAC_KEY: data["hmac_key"]}
    except (OSError, ValueError):
        pass
    return out
