"""moldctl against a real server on a temporary socket: parsing, tables, --json, jobs, exit codes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from moldd.api import ApiServer
from moldd.cli import moldctl
from moldd.cli.moldctl import COMMANDS, build_parser, command_args, format_table, parse_pairs, parse_value
from moldlab.testing.load import scaled
from tests.api.conftest import FakeBus


async def run(server: ApiServer | str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    path = server if isinstance(server, str) else server.path
    assert path is not None
    code = await asyncio.to_thread(moldctl.run, ["--socket", path, *argv], out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("false", False), ("42", 42), ("-3", -3), ("web-1", "web-1"), ("1.5", "1.5"),
     ('{"a": 1}', {"a": 1}), ("[1, 2]", [1, 2]), ("{oops", "{oops"), ("", "")],
)  # fmt: skip
def test_call_values_are_typed(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_call_pairs_accept_key_colon_equals_json() -> None:
    assert parse_pairs(["name=web-1", "count:=3", "tags:=[\"a\"]", "label:=\"007\"", "x=a=b"]) == {
        "name": "web-1", "count": 3, "tags": ["a"], "label": "007", "x": "a=b",
    }  # fmt: skip
    for bad in (["novalue"], ["=x"], ["n:={bad"]):
        with pytest.raises(ValueError):
            parse_pairs(bad)


def test_friendly_commands_map_to_verb_and_args() -> None:
    parser = build_parser()

    def mapped(*argv: str) -> tuple[str, dict[str, object]]:
        ns = parser.parse_args(list(argv))
        return ns.cmd.verb, command_args(ns.cmd, ns)

    assert mapped("vm", "stop", "web-1", "--forced") == (
        "stopVirtualMachine",
        {"name": "web-1", "forced": True},
    )
    assert mapped("vm", "stop", "web-1") == ("stopVirtualMachine", {"name": "web-1"})
    assert mapped("vm", "deploy", "--template", "debian", "--offering", "small", "--ha", "--no-start",
                  "--root-disk-gb", "20") == (
        "deployVirtualMachine",
        {"template": "debian", "serviceoffering": "small", "haenable": True, "startvm": False, "rootdisksize": 20},
    )  # fmt: skip
    assert mapped("vm", "edit", "web-1", "--no-ha")[1] == {"name": "web-1", "haenable": False}
    assert mapped("vm", "edit", "web-1", "--display-name", "Web")[1] == {
        "name": "web-1",
        "displayname": "Web",
    }
    assert mapped("vm", "resize", "web-1", "--size-gb", "40", "--shrink-ok") == (
        "resizeVolume", {"vm": "web-1", "size": 40, "shrinkok": True},
    )  # fmt: skip
    assert mapped("vm", "snapshot", "revert", "web-1", "snap1") == (
        "revertToVMSnapshot", {"vm": "web-1", "snapshot": "snap1"},
    )  # fmt: skip
    assert mapped("group", "create", "web") == ("createInstanceGroup", {"name": "web"})
    assert mapped("job", "show", "j-1") == ("queryAsyncJobResult", {"jobid": "j-1"})
    assert len({c.words for c in COMMANDS}) == len(COMMANDS)


def test_table_is_aligned_with_preferred_columns() -> None:
    rows: list[dict[str, Any]] = [
        {"name": "web-1", "state": "Running", "x": 1},
        {"name": "database-01", "state": None},
    ]
    assert format_table(rows, ("name", "state", "missing")).splitlines() == [
        "NAME         STATE",
        "web-1        Running",
        "database-01  -",
    ]


async def test_vm_list_prints_a_table(server: ApiServer) -> None:
    code, out, err = await run(server, "vm", "list", "--group", "web")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DISPLAY_NAME", "STATE", "HOST", "GROUP", "HA_ENABLED"]
    assert lines[1].split() == ["web-1", "WEB-1", "Running", "h1", "web", "no"]
    assert len(lines) == 3
    assert lines[0].index("STATE") == lines[1].index("Running") == lines[2].index("Stopped")


async def test_vm_list_json_is_the_result(server: ApiServer) -> None:
    code, out, _ = await run(server, "vm", "list", "--json")
    assert code == 0
    assert json.loads(out)["count"] == 3


async def test_vm_show_prints_key_values_and_missing_vm_fails(server: ApiServer) -> None:
    code, out, _ = await run(server, "vm", "show", "db-1")
    assert code == 0
    assert "state         Running" in out.splitlines()
    code, _, err = await run(server, "vm", "show", "nope")
    assert code == 1
    assert err.startswith("error: ")


async def test_refusal_prints_message_field_and_code_and_exits_1(server: ApiServer) -> None:
    code, out, err = await run(server, "vm", "start", "web-1")
    assert (code, out) == (1, "")
    assert err == "error: VM web-1 is Running; start needs Stopped (field: name, code: invalid_state)\n"


async def test_unknown_verb_via_call_exits_1_with_suggestion(server: ApiServer) -> None:
    code, _, err = await run(server, "call", "listVirtualMachine")
    assert code == 1
    assert "listVirtualMachines" in err and "code: unknown_command" in err


async def test_call_sends_typed_args_and_id(server: ApiServer, bus: FakeBus) -> None:
    code, out, _ = await run(server, "--json", "call", "echo", "n=3", "ok=true", "tags:=[1]", "--id", "cid-1")
    assert code == 0
    assert json.loads(out) == {
        "args": {"n": 3, "ok": True, "tags": [1]},
        "id": "cid-1",
        "actor": str(bus.calls[0].actor),
    }


async def test_usage_errors_exit_2(server: ApiServer) -> None:
    assert (await run(server, "vm", "frobnicate"))[0] == 2
    assert (await run(server, "vm", "deploy", "--template", "t"))[0] == 2  # --offering is required
    code, _, err = await run(server, "call", "echo", "oops")
    assert code == 2 and "key=value" in err


async def test_unreachable_daemon_exits_3_naming_the_socket(sock_dir: Path) -> None:
    path = str(sock_dir / "absent.sock")
    code, _, err = await run(path, "vm", "list")
    assert code == 3
    assert path in err


def test_module_entry_point_exits_3_when_daemon_is_down(sock_dir: Path) -> None:
    env = {**os.environ, "MOLDD_SOCKET": str(sock_dir / "absent.sock")}
    proc = subprocess.run([sys.executable, "-m", "moldd.cli.moldctl", "host", "list"], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 3
    assert "absent.sock" in proc.stderr


async def test_health_exit_code_follows_status(server: ApiServer, bus: FakeBus) -> None:
    assert (await run(server, "health"))[0] == 0
    bus.ok = False
    code, out, _ = await run(server, "health")
    assert code == 1 and "watchers  down" in out


async def test_job_is_followed_until_success(server: ApiServer, bus: FakeBus) -> None:
    code, out, err = await run(server, "vm", "start", "web-2")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("job job-") and lines[0].endswith(": pending")
    assert any("vm.start.requested" in line for line in lines)
    assert any("vm.started state=Running host=h1" in line for line in lines)
    assert any(line.startswith("job ") and "succeeded (web-2: Running)" in line for line in lines)
    assert bus.vms["web-2"]["state"] == "Running"


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_event_that_ended_a_job_is_printed_even_when_the_poll_sees_the_end_first(
    server: ApiServer, bus: FakeBus, as_json: bool
) -> None:
    """queryAsyncJobResult and the event stream are two connections: the poll can report the job's end while the
    event that ended it is still on its way. moldctl waits for that event instead of dropping it."""
    bus.outcome_before_event_s = 0.5
    code, out, err = await run(server, *(["--json"] if as_json else []), "vm", "start", "web-2")
    assert code == 0, err
    if as_json:
        lines = [json.loads(line) for line in err.splitlines()]
        types = [e["event"]["event_type"] for e in lines if "event" in e]
        assert types[-1] == "vm.started", lines
        assert json.loads(out)["job"]["status"] == "succeeded"
    else:
        lines = out.splitlines()
        ended = [i for i, line in enumerate(lines) if "vm.started" in line and "job_status=succeeded" in line]
        done = [i for i, line in enumerate(lines) if line.startswith("job ") and "succeeded" in line]
        assert ended and done and ended[0] < done[-1], out


async def test_job_is_followed_until_failure_exit_1(server: ApiServer) -> None:
    code, out, err = await run(server, "vm", "deploy", "--template", "broken", "--offering", "small")
    assert code == 1
    assert any("vm.start.failed" in line for line in out.splitlines())
    assert err == "error: qemu: disk missing (code: operation_failed)\n"


async def test_job_json_mode_prints_final_job_and_progress_to_stderr(server: ApiServer) -> None:
    code, out, err = await run(server, "--json", "vm", "start", "web-2")
    assert code == 0
    assert json.loads(out)["job"]["status"] == "succeeded"
    assert "vm.started" in err


async def test_job_is_followed_by_polling_when_the_stream_is_unavailable(
    server: ApiServer, bus: FakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_stream(*_: object, **__: object) -> object:
        raise moldctl.Unreachable("no stream")

    monkeypatch.setattr(moldctl.Client, "events", no_stream)
    code, out, _ = await run(server, "vm", "start", "web-2")
    assert code == 0
    assert "succeeded" in out


async def test_no_wait_returns_the_pending_job(server: ApiServer) -> None:
    code, out, _ = await run(server, "--json", "vm", "start", "web-2", "--no-wait")
    assert code == 0
    assert json.loads(out)["job"]["status"] == "pending"


async def test_an_object_result_is_printed_as_key_values_not_a_json_blob(server: ApiServer) -> None:
    code, out, err = await run(server, "group", "create", "web")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["name         web", "description", "vms          -"]
    code, out, _ = await run(server, "vm", "edit", "web-1", "--display-name", "Web one")
    assert code == 0
    assert "{" not in out
    lines = out.splitlines()
    assert lines[0] == "vm:"
    assert "  display_name  Web one" in lines
    assert "  offering:" in lines and "    vcpus  1" in lines
    assert lines[-2:] == ["changed:", "  display_name  Web one"]


async def test_list_cells_are_comma_separated() -> None:
    assert format_table([{"name": "web", "vms": ["a", "b"]}, {"name": "db", "vms": []}]).splitlines() == [
        "NAME  VMS", "web   a, b", "db    -",
    ]  # fmt: skip


async def test_events_follow_starts_at_the_end_unless_from_is_given(server: ApiServer, bus: FakeBus) -> None:
    await bus._append("vm-old", "vm.created", {"state": "Stopped"})
    path = server.path
    assert path is not None
    out = io.StringIO()

    def follow(*extra: str) -> None:
        moldctl.run(["--socket", path, "events", "--follow", *extra], out, io.StringIO())

    threading.Thread(target=follow, daemon=True).start()
    await asyncio.wait_for(bus.following.wait(), scaled(10))  # the follower chose where to start: the end
    await bus._append(
        "vm-new", "libvirt.domain_event", {"event": "STOPPED", "detail": "DESTROYED", "host": "h1"}
    )
    for _ in range(int(scaled(10) / 0.05)):
        if "vm-new" in out.getvalue():
            break
        await asyncio.sleep(0.05)
    assert out.getvalue().splitlines() == [
        "[2] vm-new libvirt.domain_event event=STOPPED detail=DESTROYED host=h1"
    ]
    out2 = io.StringIO()
    threading.Thread(
        target=lambda: moldctl.run(["--socket", path, "events", "-f", "--from", "1"], out2, io.StringIO()),
        daemon=True,
    ).start()
    for _ in range(int(scaled(10) / 0.05)):
        if "[2]" in out2.getvalue():
            break
        await asyncio.sleep(0.05)
    assert out2.getvalue().splitlines()[0] == "[1] vm-old vm.created state=Stopped"


async def test_socket_and_timeout_are_accepted_after_the_subcommand(server: ApiServer) -> None:
    assert server.path is not None
    out = io.StringIO()
    code = await asyncio.to_thread(
        moldctl.run, ["vm", "list", "--socket", server.path, "--timeout", "5"], out, io.StringIO()
    )
    assert code == 0 and "web-1" in out.getvalue()
