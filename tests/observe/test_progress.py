"""Progress of long work: moldctl's bar (terminal, plain lines, ``--json`` events) from libvirt's job info, as
recorded in ``*.progress`` log entries, and the same progress in ``/v1/status`` for the page."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from moldd.cli import moldctl
from moldd.cli.moldctl import ProgressBar, progress_of
from moldlab.testing.harness import Client
from tests.observe.conftest import get


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ENTRY = {"position": 9, "event_type": "vm.migrate.progress"}


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    out = Terminal()
    bar = ProgressBar(out, "j1")
    for pct in (10.0, 55.5, 100.0):
        bar.update(
            ENTRY, {"percent": pct, "data_total": 1 << 30, "data_remaining": int((1 << 30) * (1 - pct / 100))}
        )
    bar.clear()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 30 + "] 100.0 % migrate  1.0 GiB / 1.0 GiB" in text
    assert "[" + "#" * 3 + "." * 27 + "]  10.0 %" in text


def test_progress_bar_prints_lines_when_not_a_terminal_and_json_with_json() -> None:
    out = io.StringIO()
    ProgressBar(out, "j1").update(ENTRY, {"percent": 42.0})
    assert out.getvalue() == "  [" + "#" * 13 + "." * 17 + "]  42.0 % migrate\n"
    out = io.StringIO()
    ProgressBar(out, "j1", as_json=True).update(ENTRY, {"percent": 42.0, "type": "unbounded"})
    assert json.loads(out.getvalue()) == {
        "job": "j1", "position": 9, "event_type": "vm.migrate.progress",
        "progress": {"percent": 42.0, "type": "unbounded"},
    }  # fmt: skip


def test_a_job_without_a_percentage_shows_a_spinner_with_time_and_state_on_a_terminal() -> None:
    out = Terminal()
    bar = ProgressBar(out, "j1")
    bar.tick({"status": "running", "state": "Starting"}, 1.23)
    bar.tick({"status": "succeeded", "state": "Running"}, 2.0)  # final: nothing more to draw
    assert out.getvalue() == "\r\x1b[2K  / running 1.2 s (VM Starting)"
    bar.update(ENTRY, {"percent": 5.0})
    before = out.getvalue()
    bar.tick({"status": "running"}, 3.0)  # a percentage is known: the bar stays
    assert out.getvalue() == before
    plain = io.StringIO()
    ProgressBar(plain, "j1").tick({"status": "running"}, 1.0)
    ProgressBar(plain, "j1", as_json=True).tick({"status": "running"}, 1.0)
    assert plain.getvalue() == ""  # logs and pipes get no spinner noise


@pytest.mark.parametrize(
    "entry",
    [
        {"event_type": "vm.migrated", "payload": {"progress": {"percent": 1}}},
        {"event_type": "vm.migrate.progress", "payload": {"progress": {"percent": "50"}}},
        {"event_type": "vm.migrate.progress", "payload": {"progress": None}},
        {"event_type": "vm.migrate.progress", "payload": []},
        {"event_type": "vm.migrate.progress"},
    ],
)
def test_only_well_formed_progress_entries_draw_the_bar(entry: dict[str, Any]) -> None:
    assert progress_of(entry) is None


async def moldctl_run(socket: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(moldctl.run, ["--socket", socket, *argv], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.libvirt
async def test_moldctl_shows_migration_progress_and_json_progress_events(daemon: Any, client: Client) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small", host="host0")
    name = job["vm"]
    sock = str(daemon.config.socket)

    code, out, err = await moldctl_run(sock, "vm", "migrate", name, "--host", "host1")
    assert code == 0, err
    bars = [line for line in out.splitlines() if line.startswith("  [") and "% migrate" in line]
    assert bars and bars[-1].startswith("  [" + "#" * 30 + "] 100.0 % migrate"), out
    assert "succeeded" in out.splitlines()[-1] or any("succeeded" in line for line in out.splitlines())

    code, out, err = await moldctl_run(sock, "--json", "vm", "migrate", name, "--host", "host0")
    assert code == 0, err
    assert json.loads(out)["job"]["status"] == "succeeded"
    lines = [json.loads(line) for line in err.splitlines()]  # every progress line is JSON in --json mode
    progress = [e["progress"] for e in lines if "progress" in e]
    assert progress and progress[-1] == {"type": "completed", "percent": 100.0}
    assert all(e["job"] == lines[0]["job"] for e in lines)
    assert any(e.get("event", {}).get("event_type") == "vm.migrated" for e in lines)

    _, _, body = await get(sock, "/v1/status")
    jobs = {j["id"]: j for j in json.loads(body)["result"]["jobs"]}
    migrations = [j for j in jobs.values() if j["command"].startswith("vm.migrate")]
    assert len(migrations) == 2 and all(j["progress"]["percent"] == 100.0 for j in migrations)
