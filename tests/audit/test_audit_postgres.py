"""moldd-audit on a log kept in PostgreSQL: the real recorded log copied there (python -m events copy) gives
the same verify, state, history and export output as the file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from events.copy import async_copy
from moldd.cli.audit import main as audit_main
from moldlab.testing.pgserver import PgServer
from tests.audit.conftest import RecordedLog


def _run(capsys: Any, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = audit_main(list(argv))
    return code, capsys.readouterr().out


def test_audit_tools_on_a_dsn_match_the_file(
    recorded_log: RecordedLog, pg_server: PgServer, tmp_path: Path, capsys: Any
) -> None:
    db = recorded_log.copy(tmp_path / "copy")
    dsn = pg_server.dsn()
    schema = "audit_copy"
    _log_id, position, head = asyncio.run(async_copy(db, dsn, dst_schema=schema))
    assert position >= recorded_log.live_position
    main = recorded_log.vm_names["main"]
    for argv in (
        ["verify", "--json"],
        ["state", "--json"],
        ["state", "--json", "--at-position", "5"],
        ["history", "--json", main],
        ["export", "--format", "jsonl"],
        ["export", "--format", "csv", "--from", "3", "--to", "9"],
    ):
        code_file, out_file = _run(capsys, argv[0], str(db), *argv[1:])
        code_pg, out_pg = _run(capsys, argv[0], dsn, "--schema", schema, *argv[1:])
        assert (code_pg, code_file) == (0, 0), argv
        if argv[0] == "verify":
            a, b = json.loads(out_file), json.loads(out_pg)
            for k in ("path", "snapshots_checked"):  # snapshots are not copied (they are not the log)
                a.pop(k, None)
                b.pop(k, None)
            assert a == b and b["head_hash"] == head.hex() and b["status"] == "intact"
        else:
            assert out_pg == out_file, argv
    code, _ = _run(capsys, "state", dsn, "--schema", "no_such_schema")
    assert code == 2
