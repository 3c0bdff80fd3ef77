"""Attacks on the data beside the chain, against a real daemon on the lab hosts (issue 10): forged snapshots,
history rewritten while the daemon was stopped or under it, file modes, a readable signing key."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from events import LogIntegrityError
from events.canonical import canonical_json
from events.chain import encode_fields, genesis_hash, link_hash
from moldd.audit.checkpoint import keygen
from moldd.cli.audit import main as audit_main
from moldlab.testing.harness import Client, running_daemon

COLUMNS = (
    "position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash"
)


def attacker(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def rewrite_with_fresh_hashes(db: Path, position: int, edit: Any) -> None:
    """A chain-aware rewrite: change one payload and recompute every hash from there on."""
    conn = attacker(db)
    log_id = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]
    rows = conn.execute(f"SELECT {COLUMNS} FROM events ORDER BY position").fetchall()
    prev = genesis_hash(log_id)
    conn.execute("BEGIN")
    for row in rows:
        pos, sid, sv, et, schv, ts, actor, cid, caus, corr, payload, _prev, _h = row
        if pos == position:
            payload = canonical_json(edit(json.loads(payload)))
        new = link_hash(prev, pos, sv, ts, schv, encode_fields(sid, et, actor, cid, caus, corr), payload)
        if pos >= position:
            conn.execute(
                "UPDATE events SET payload = ?, prev_hash = ?, hash = ? WHERE position = ?", (payload, prev, new, pos)
            )
        prev = new
    conn.execute("COMMIT")
    conn.execute("DELETE FROM snapshots")  # snapshots are disposable: the attacker drops the one now stale
    conn.close()


async def test_a_forged_snapshot_is_ignored_and_reported(make_config: Any, tmp_path: Path) -> None:
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        ha = await client.job(
            "deployVirtualMachine", template="tiny", offering="small", startvm=False, ha=True, displayname="Real"
        )
        before = (await client.call("listVirtualMachines"))["result"]
    # the daemon is stopped: its snapshot is sealed at the head. Edit it: rename, a phantom VM, HA off.
    conn = sqlite3.connect(config.database, isolation_level=None)
    (state,) = conn.execute("SELECT state FROM snapshots WHERE name = 'moldd.readmodel'").fetchone()
    s = json.loads(state)
    vm = s["vms"][ha["vm"]]
    assert vm["ha_enabled"] is True
    phantom = dict(vm, name="vm-phantom", display_name="Phantom", internal_name="i-2-99-VM", id=99)
    vm["display_name"], vm["ha_enabled"] = "Renamed", False
    s["vms"]["vm-phantom"] = phantom
    conn.execute("UPDATE snapshots SET state = ? WHERE name = 'moldd.readmodel'", (canonical_json(s),))
    conn.close()

    async with running_daemon(config) as d, Client(d.config.socket) as client:
        after = (await client.call("listVirtualMachines"))["result"]
        assert after == before  # the daemon folded the log, not the forged snapshot
        assert "vm-phantom" not in d.app.model.vms and d.app.model.vms[ha["vm"]].ha_enabled
        events = (await client.call("listEvents", limit=10000))["result"]["event"]
        assert not [e for e in events if e["event_type"] == "vm.reconciled" and "phantom" in json.dumps(e)]
    # a verifier that folds the log reports the bad snapshot (the daemon has replaced it by now: forge it again)
    conn = sqlite3.connect(config.database, isolation_level=None)
    conn.execute("UPDATE snapshots SET state = ? WHERE name = 'moldd.readmodel'", (canonical_json(s),))
    conn.close()
    assert audit_main(["verify", str(config.database)]) == 1


async def test_history_rewritten_while_stopped_refuses_the_start(make_config: Any, tmp_path: Path) -> None:
    keygen(tmp_path / "moldd" / "keys")
    config = make_config(checkpoints=True)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname="A")
        assert await d.async_checkpoint_now()
    lines = config.checkpoints.file.read_text().splitlines()
    # rewrite the first host registration with recomputed hashes: every row still links, the chain "verifies"
    rewrite_with_fresh_hashes(config.database, 1, lambda p: p | {"max_vms": 999})
    from events import verify

    assert verify(config.database).exit_code == 0  # the chain alone cannot tell
    with pytest.raises(LogIntegrityError) as err:
        async with running_daemon(config):
            pass
    assert err.value.kind == "rewritten" and err.value.position is not None
    assert config.checkpoints.file.read_text().splitlines() == lines  # nothing sealed over the forgery
    # the command line: a clear message and exit code 3
    proc = subprocess.run(
        [sys.executable, "-m", "moldd.daemon", "--config", str(config.path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 3, proc.stderr
    assert "refusing to start" in proc.stderr and "does not verify at position" in proc.stderr
    assert config.checkpoints.file.read_text().splitlines() == lines


async def test_an_edited_row_without_snapshot_refuses_the_start(make_config: Any) -> None:
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
    conn = attacker(config.database)
    conn.execute("DELETE FROM snapshots")
    conn.execute("UPDATE events SET payload = ? WHERE position = 2", (b'{"forged":true}',))
    conn.close()
    with pytest.raises(LogIntegrityError) as err:
        async with running_daemon(config):
            pass
    assert (err.value.kind, err.value.position) == ("hash_mismatch", 2)


async def test_a_row_the_fold_cannot_read_refuses_the_start_as_a_log_that_does_not_verify(make_config: Any) -> None:
    """The tail is folded while the chain is verified: a forged row that also breaks the fold (a payload that is
    not JSON, an event that is not an object) is still reported as the row that does not verify."""
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
    for forged in (b"{not json", b"[1, 2]"):
        conn = attacker(config.database)
        conn.execute("DELETE FROM snapshots")
        conn.execute("UPDATE events SET payload = ? WHERE position = 2", (forged,))
        conn.close()
        with pytest.raises(LogIntegrityError) as err:
            async with running_daemon(config):
                pass
        assert (err.value.kind, err.value.position) == ("hash_mismatch", 2), forged


async def test_a_row_changed_under_the_running_daemon_is_never_signed(make_config: Any, tmp_path: Path) -> None:
    keygen(tmp_path / "moldd" / "keys")
    config = make_config(checkpoints=True, daemon={"snapshot_every": 100000})
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        assert await d.async_checkpoint_now()
        await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
        head, _ = await d.store.async_head()
        conn = attacker(config.database)
        conn.execute("UPDATE events SET payload = ? WHERE position = ?", (b'{"forged":true}', head - 1))
        conn.close()
        lines = config.checkpoints.file.read_text().splitlines()
        assert not await d.async_checkpoint_now()
        assert config.checkpoints.file.read_text().splitlines() == lines
        assert d.integrity_error is not None and not d.healthy()


async def test_files_are_private_whatever_the_umask_and_a_readable_key_is_refused(
    make_config: Any, tmp_path: Path
) -> None:
    old = os.umask(0o000)
    try:
        priv, _ = keygen(tmp_path / "moldd" / "keys")
        config = make_config(checkpoints=True, daemon={"database": str(tmp_path / "moldd" / "state" / "log.db")})
        async with running_daemon(config) as d, Client(d.config.socket) as client:
            await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False)
            assert await d.async_checkpoint_now()
            for suffix in ("", "-wal", "-shm"):
                mode = os.stat(str(config.database) + suffix).st_mode & 0o777
                assert mode == 0o600, (suffix, oct(mode))
            assert os.stat(config.checkpoints.file).st_mode & 0o777 == 0o640
            assert os.stat(config.database.parent).st_mode & 0o007 == 0
        os.chmod(priv, 0o644)
        from moldd.integrity import KeyFileError

        with pytest.raises(KeyFileError, match="chmod 0600"):
            async with running_daemon(config):
                pass
    finally:
        os.umask(old)


RLO = "\u202e"


async def test_control_and_format_characters_are_refused_in_names_and_ids(make_config: Any) -> None:
    from moldlab.testing.harness import CommandFailed

    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        before, _ = await d.store.async_head()
        for args in (
            {"displayname": f"web{RLO}gpj.exe"},
            {"displayname": "a\x1b[2Jb"},
            {"displayname": "zero\u200bwidth"},
        ):
            with pytest.raises(CommandFailed) as err:
                await client.call("deployVirtualMachine", template="tiny", offering="small", startvm=False, **args)
            assert err.value.status == 400 and err.value.field == "displayname" and "U+" in str(err.value)
        with pytest.raises(CommandFailed) as err:
            await client.call("listVirtualMachines", command_id=f"id{RLO}1")
        assert err.value.status == 400 and err.value.field == "id"
        with pytest.raises(CommandFailed) as err:
            await client.call("stopVirtualMachine", id=f"vm{RLO}x")
        assert err.value.status == 400 and err.value.field == "id"
        assert (await d.store.async_head())[0] == before  # nothing written


async def test_audit_output_escapes_what_an_older_moldd_let_into_the_log(
    make_config: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A log written before names were checked (validation bypassed here, as an older moldd did) holds a
    display name with U+202E: moldd-audit and moldctl print it escaped, never raw."""
    import moldd.app.lifecycle as lifecycle
    from moldd.cli.moldctl import _cell

    monkeypatch.setattr(lifecycle, "validate_display_name", lambda v, field="displayname": v)
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        job = await client.job(
            "deployVirtualMachine", template="tiny", offering="small", startvm=False, displayname=f"evil{RLO}txt.exe"
        )
    capsys.readouterr()
    for argv in (["history", str(config.database), job["vm"]], ["state", str(config.database)]):
        assert audit_main(argv) == 0
        out = capsys.readouterr().out
        assert RLO not in out and job["vm"] in out
        assert argv[0] == "history" or "evil\\u202etxt.exe" in out
    assert audit_main(["history", str(config.database), job["vm"], "--json"]) == 0
    out = capsys.readouterr().out
    assert RLO not in out and json.loads(out)["vm"] == job["vm"]
    assert _cell(f"evil{RLO}") == "evil\\u202e"


def append_forged(db: Path, stream: str, event_type: str, payload: dict[str, Any]) -> int:
    """What whoever can write the file can always do: append a row with a correct chain link."""
    conn = attacker(db)
    pos, prev, ts = conn.execute("SELECT position, hash, recorded_at FROM events ORDER BY position DESC").fetchone()
    sv = conn.execute("SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = ?", (stream,)).fetchone()[0]
    data = canonical_json(payload)
    fields = encode_fields(stream, event_type, "system", None, None, None)
    h = link_hash(prev, pos + 1, sv + 1, ts + 1, 1, fields, data)
    conn.execute(
        f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (pos + 1, stream, sv + 1, event_type, 1, ts + 1, "system", None, None, None, data, prev, h),
    )
    conn.close()
    return pos + 1


async def test_a_forged_seal_appended_to_the_chain_is_refused_with_a_key_and_caught_by_audit(
    make_config: Any, tmp_path: Path
) -> None:
    import hashlib

    keygen(tmp_path / "moldd" / "keys")
    config = make_config(checkpoints=True)
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        job = await client.job("deployVirtualMachine", template="tiny", offering="small", startvm=False, ha=True)
        before = (await client.call("listVirtualMachines"))["result"]
        assert await d.async_checkpoint_now()
    conn = sqlite3.connect(config.database, isolation_level=None)
    position, head_hash, state = conn.execute(
        "SELECT position, head_hash, state FROM snapshots WHERE name = 'moldd.readmodel'"
    ).fetchone()
    conn.close()
    s = json.loads(state)
    s["vms"][job["vm"]]["ha_enabled"] = False
    forged = canonical_json(s)
    seal = {"name": "moldd.readmodel", "position": position, "head_hash": head_hash.hex(),
            "digest": hashlib.sha256(forged).hexdigest()}  # fmt: skip
    append_forged(config.database, "snapshot-moldd.readmodel", "snapshot.sealed", seal)
    conn = sqlite3.connect(config.database, isolation_level=None)
    conn.execute("UPDATE snapshots SET state = ? WHERE name = 'moldd.readmodel'", (forged,))
    conn.close()
    assert audit_main(["verify", str(config.database)]) == 1  # the fold does not produce the sealed state
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        assert d.app.model.vms[job["vm"]].ha_enabled  # an unsigned seal is not trusted: the log was folded
        assert (await client.call("listVirtualMachines"))["result"] == before


async def test_forged_commands_rows_neither_replay_another_job_nor_fail(make_config: Any) -> None:
    """Issue 10, item 2: a row in the (legacy, unchained) commands table pointing at another VM's events, or
    past the end of the log, changes nothing: command ids are answered from the chained rows only."""
    config = make_config()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        first = await client.call(
            "deployVirtualMachine", command_id="cmd-real", template="tiny", offering="small", startvm=False
        )
        await client.wait_job(first["result"]["job"]["id"])
        head, _ = await d.store.async_head()
    conn = sqlite3.connect(config.database, isolation_level=None)
    name = first["result"]["vm"]["name"]
    conn.execute("INSERT INTO commands VALUES ('cmd-stolen', ?, 1, ?, 1)", (f"vm-{name}", head))
    conn.execute("INSERT INTO commands VALUES ('cmd-beyond', 'vm-x', ?, ?, 9)", (head + 100, head + 200))
    conn.close()
    async with running_daemon(config) as d, Client(d.config.socket) as client:
        for cid in ("cmd-stolen", "cmd-beyond"):
            reply = await client.call(
                "deployVirtualMachine", command_id=cid, template="tiny", offering="small", startvm=False
            )
            job = await client.wait_job(reply["result"]["job"]["id"])
            assert job["status"] == "succeeded" and reply["result"]["vm"]["name"] != name, cid
        again = await client.call(
            "deployVirtualMachine", command_id="cmd-real", template="tiny", offering="small", startvm=False
        )
        assert again["result"]["job"]["id"] == first["result"]["job"]["id"]  # the real id answers its own job
        assert len(d.app.model.vms) == 3
