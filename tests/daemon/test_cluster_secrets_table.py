"""The shared secrets table (moldd.cluster_secrets) on a real PostgreSQL: a single node's files seed it once, a key
never takes a second value (a deposed leader's late insert changes nothing), deletions remove only what they
name, and the table is outside the log (its rows are in no log table)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from events.postgres import PostgresEventStore
from moldd.app.secrets import write_private_file
from moldd.cluster_secrets import API, HMAC_KEY, SETTINGS, SETTINGS_KEY, SharedSecrets, local_secrets
from moldlab.testing.pgserver import PgServer

_n = itertools.count(1)


@pytest.fixture
async def table(pg_server: PgServer) -> AsyncIterator[SharedSecrets]:
    schema = f"sectable{os.getpid()}_{next(_n)}"
    store = await PostgresEventStore.async_open(pg_server.dsn(), schema=schema)  # the log's schema exists
    await store.async_close()
    shared = SharedSecrets(pg_server.dsn(), schema)
    await shared.async_open()
    yield shared
    await shared.async_close()


def write_files(root: Path) -> tuple[Path, Path]:
    api, settings = root / "api-secrets.json", root / "secrets.json"
    write_private_file(api, json.dumps({"key-a": "secret-a"}).encode())
    write_private_file(settings, json.dumps({"hmac_key": "ab" * 32, "values": {"id1": "vnc-1"}}).encode())
    return api, settings


async def test_a_single_nodes_files_seed_the_table_once(table: SharedSecrets, tmp_path: Path) -> None:
    local = local_secrets(*write_files(tmp_path))
    assert local == {API: {"key-a": "secret-a"}, SETTINGS: {"id1": "vnc-1"}, SETTINGS_KEY: {HMAC_KEY: "ab" * 32}}
    assert await table.async_seed(local) == {API: 1, SETTINGS: 1, SETTINGS_KEY: 1}
    # another node's (different) files do not seed a kind that has rows
    other = {API: {"key-b": "secret-b"}, SETTINGS: {"id2": "x"}, SETTINGS_KEY: {HMAC_KEY: "cd" * 32}}
    assert await table.async_seed(other) == {}
    assert await table.async_load() == local
    assert local_secrets(tmp_path / "none.json", tmp_path / "none2.json") == {API: {}, SETTINGS: {}, SETTINGS_KEY: {}}


async def test_a_key_never_takes_a_second_value_and_deletes_are_exact(table: SharedSecrets) -> None:
    await table.async_put(SETTINGS_KEY, {HMAC_KEY: "first"})
    await table.async_put(SETTINGS_KEY, {HMAC_KEY: "second"})  # a later node's key: the first stays
    await table.async_put(API, {"k1": "s1", "k2": "s2"})
    await table.async_put(API, {"k1": "forged"})  # a stale or forged insert changes nothing
    await table.async_delete(API, ("k2", "unknown"))
    loaded = await table.async_load()
    assert loaded[SETTINGS_KEY] == {HMAC_KEY: "first"} and loaded[API] == {"k1": "s1"}


async def test_the_table_is_outside_the_log(table: SharedSecrets, pg_server: PgServer) -> None:
    await table.async_put(API, {"k1": "very-secret-value"})
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        for t in ("events", "commands", "meta", "epochs", "snapshots"):
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{table.schema}".{t} t')
            assert all("very-secret-value" not in r["row"] for r in rows), t
    finally:
        await conn.close()
