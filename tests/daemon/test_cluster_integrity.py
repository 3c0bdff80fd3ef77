"""Verify at start and signed checkpoints on a PostgreSQL log (issue 14), against a real daemon on the lab hosts and
a real PostgreSQL: rows forged directly in the database by a superuser (its triggers bypassed), a chain-aware
rewrite under an older checkpoint, a forged checkpoint line, a row changed under the running leader."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events import LogIntegrityError
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from events.copy import verify_target
from moldd.audit.checkpoint import keygen
from moldd.cli.audit import main as audit_main
from moldlab.testing.cluster import FAST
from moldlab.testing.harness import Client, running_daemon
from moldlab.testing.pgserver import PgServer

pytestmark = [pytest.mark.libvirt]
_n = itertools.count(1)
COLUMNS = (
    "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash"
)
REPO = Path(__file__).resolve().parents[2]


def pg_config(make_config: Any, pg: PgServer, daemon: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, str]:
    schema = f"integrity{os.getpid()}_{next(_n)}"
    d = {"database": pg.dsn(), **(daemon or {})}
    config = make_config(daemon=d, cluster={"node": "n1", "schema": schema, **FAST}, **kw)
    return config, schema


async def wait_acting(d: Any, client: Client | None = None, timeout: float = 120) -> None:
    """The only node leads, acts, and (with `client`) sees every host up."""
    deadline = time.monotonic() + timeout
    while not (d.cluster is not None and d.cluster.acting):
        if time.monotonic() > deadline:
            raise TimeoutError("the only node never took the lead")
        await asyncio.sleep(0.05)
    if client is not None:
        for host in d.config.hosts:
            await client.wait_host(host.name, timeout=60, health="Up", link="connected")


async def superuser(pg: PgServer) -> asyncpg.Connection:
    """The attacker: PostgreSQL's superuser, triggers off for its session (session_replication_role)."""
    conn = await asyncpg.connect(pg.dsn())
    await conn.execute("SET session_replication_role = replica")
    return conn


async def forge_payload(pg: PgServer, schema: str, position: int, payload: bytes) -> None:
    conn = await superuser(pg)
    try:
        await conn.execute(f'UPDATE "{schema}".events SET payload = $1 WHERE position = $2', payload, position)
        await conn.execute(f'DELETE FROM "{schema}".snapshots')  # the stale snapshot goes too
    finally:
        await conn.close()


async def rewrite_with_fresh_hashes(pg: PgServer, schema: str, position: int, edit: Any) -> None:
    """A chain-aware rewrite: one payload changed and every hash from there on recomputed."""
    conn = await superuser(pg)
    try:
        log_id = await conn.fetchval(f"SELECT value FROM \"{schema}\".meta WHERE key = 'log_id'")
        rows = await conn.fetch(f'SELECT {COLUMNS} FROM "{schema}".events ORDER BY position')
        prev = genesis_hash(log_id)
        async with conn.transaction():
            for row in rows:
                pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, _prev, _h = row
                if pos == position:
                    payload = canonical_json(edit(json.loads(payload)))
                new = link_hash(prev, pos, sv, ts, schv, encode_fields(sid, et, actor, cid, caus, corr), payload)
                if pos >= position:
                    await conn.execute(
                        f'UPDATE "{schema}".events SET payload = $1, prev_hash = $2, hash = $3 WHERE position = $4',
                        payload,
                        prev,
                        new,
                        pos,
                    )
                prev = new
            await conn.execute(f'DELETE FROM "{schema}".snapshots')
    finally:
        await conn.close()


def start_process(config: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moldd.daemon", "--config", str(config.path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )


async def test_a_row_forged_by_a_postgresql_superuser_refuses_the_start_naming_its_position(
    make_config: Any, pg_server: PgServer
) -> None:
    config, schema = pg_config(make_config, pg_server)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await wait_acting(d, client)
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        assert d.verified is not None
    # the daemon role could not do this (triggers, privileges); the database's superuser can
    await forge_payload(pg_server, schema, 2, b'{"forged":true}')
    with pytest.raises(LogIntegrityError) as err:
        async with running_daemon(config):
            pass
    assert (err.value.kind, err.value.position) == ("hash_mismatch", 2)
    # the real process: exit code 3, the position named, the DSN without any password
    proc = start_process(config)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "refusing to start" in proc.stderr and "does not verify at position 2" in proc.stderr
    assert f"(schema {schema})" in proc.stderr


async def test_a_rewrite_under_a_signed_checkpoint_refuses_the_start_and_a_forged_checkpoint_is_reported(
    make_config: Any, pg_server: PgServer, tmp_path: Path
) -> None:
    keygen(tmp_path / "moldd" / "keys")
    config, schema = pg_config(make_config, pg_server, checkpoints=True)
    dsn = pg_server.dsn()
    public = str(tmp_path / "moldd" / "keys" / "checkpoint.pub")
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await wait_acting(d, client)
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname="A")
        assert await d.async_checkpoint_now()  # the leader signs the PostgreSQL log's head
    lines = config.checkpoints.file.read_text().splitlines()
    signed = json.loads(lines[-1])
    assert signed["log_id"] == d.store.log_id and signed["position"] >= 1
    ok = ["verify", dsn, "--schema", schema, "--checkpoints", str(config.checkpoints.file), "--public-key", public]
    assert await asyncio.to_thread(audit_main, ok) == 0

    # a forged checkpoint line (a real one with another head hash) is reported by verify, ignored at start
    forged = dict(signed, head_hash="00" * 32, seq=signed.get("seq", 0) + 1)
    with open(config.checkpoints.file, "a") as f:
        f.write(json.dumps(forged) + "\n")
    report = await asyncio.to_thread(
        verify_target, dsn, schema=schema, checkpoints=config.checkpoints.file, public_key=public
    )
    assert report.exit_code == 1 and any(i.kind == "checkpoint_invalid" for i in report.issues), report.render()
    assert await asyncio.to_thread(audit_main, ok) == 1
    async with running_daemon(config) as d:
        await wait_acting(d)
        assert d.verified is not None and d.integrity_error is None
    config.checkpoints.file.write_text("\n".join(lines) + "\n")
    lines = config.checkpoints.file.read_text().splitlines()

    # a chain-aware rewrite of the first event: the chain alone verifies, the checkpoint does not
    await rewrite_with_fresh_hashes(pg_server, schema, 1, lambda p: p | {"max_vms": 999})
    assert (await asyncio.to_thread(verify_target, dsn, schema=schema)).exit_code == 0
    with pytest.raises(LogIntegrityError) as err:
        async with running_daemon(config):
            pass
    assert err.value.kind == "rewritten" and err.value.position is not None and err.value.position >= 1
    assert config.checkpoints.file.read_text().splitlines() == lines  # nothing sealed over the forgery
    assert await asyncio.to_thread(audit_main, ok) == 1
    proc = start_process(config)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"does not verify at position {err.value.position}" in proc.stderr
    assert config.checkpoints.file.read_text().splitlines() == lines


async def test_a_row_changed_in_postgresql_under_the_running_leader_is_never_signed(
    make_config: Any, pg_server: PgServer, tmp_path: Path
) -> None:
    keygen(tmp_path / "moldd" / "keys")
    config, schema = pg_config(make_config, pg_server, daemon={"snapshot_every": 100000}, checkpoints=True)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await wait_acting(d, client)
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        assert await d.async_checkpoint_now()
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        head, _ = await d.store.async_head()
        conn = await superuser(pg_server)
        try:
            await conn.execute(
                f'UPDATE "{schema}".events SET payload = $1 WHERE position = $2', b'{"forged":true}', head - 1
            )
        finally:
            await conn.close()
        lines = config.checkpoints.file.read_text().splitlines()
        assert not await d.async_checkpoint_now()
        assert config.checkpoints.file.read_text().splitlines() == lines
        assert d.integrity_error is not None and not d.healthy()


async def test_a_snapshot_forged_in_postgresql_is_ignored_and_the_log_is_folded(
    make_config: Any, pg_server: PgServer, tmp_path: Path
) -> None:
    keygen(tmp_path / "moldd" / "keys")  # snapshots are sealed with the checkpoint key, as on SQLite
    config, schema = pg_config(make_config, pg_server, checkpoints=True)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await wait_acting(d, client)
        ha = await client.job(
            "deployVirtualMachine", template="tiny", offering="small", startvm=False, ha=True, displayname="Real"
        )
        before = (await client.call("listVirtualMachines"))["result"]
        await d.projector.async_snapshot()  # the leader seals a snapshot (a standby never does)
    # The daemon's role itself may UPDATE snapshots: edit it (rename, a phantom VM, HA off).
    conn = await asyncpg.connect(pg_server.dsn())
    try:
        state = await conn.fetchval(f"SELECT state FROM \"{schema}\".snapshots WHERE name = 'moldd.readmodel'")
        s = json.loads(state)
        vm = s["vms"][ha["vm"]]
        assert vm["ha_enabled"] is True
        s["vms"]["vm-phantom"] = dict(vm, name="vm-phantom", display_name="Phantom", internal_name="i-2-99-VM", id=99)
        vm["display_name"], vm["ha_enabled"] = "Renamed", False
        await conn.execute(
            f"UPDATE \"{schema}\".snapshots SET state = $1 WHERE name = 'moldd.readmodel'", canonical_json(s)
        )
    finally:
        await conn.close()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await wait_acting(d)
        after = (await client.call("listVirtualMachines"))["result"]
        assert after == before  # the daemon folded the log, not the forged snapshot
        assert "vm-phantom" not in d.app.model.vms and d.app.model.vms[ha["vm"]].ha_enabled
        assert d.integrity_error is None
