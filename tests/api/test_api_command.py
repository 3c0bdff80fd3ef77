"""POST /v1/command: the envelope, verbs, error mapping and the actor, over a real Unix socket."""

from __future__ import annotations

import os
import pwd

import aiohttp
import pytest

from moldd.domain.errors import CapacityError, Conflict, MolddError, PermissionDenied, Unavailable
from tests.api.conftest import FakeBus, Poster


async def test_command_reply_carries_result_and_position(post: Poster, bus: FakeBus) -> None:
    status, reply = await post({"command": "listVirtualMachines", "args": {"group": "web"}})
    assert status == 200
    assert reply["ok"] is True
    assert reply["position"] == 0
    assert [vm["name"] for vm in reply["result"]["virtualmachine"]] == ["web-1", "web-2"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"args": {}}, "command"),
        ({"command": 7}, "command"),
        ({"command": ""}, "command"),
        ({"command": "echo", "args": [1, 2]}, "args"),
        ({"command": "echo", "args": "x=1"}, "args"),
        ({"command": "echo", "id": 12}, "id"),
        ({"command": "echo", "id": ""}, "id"),
        ({"command": "echo", "id": "x" * 129}, "id"),
        ({"command": "echo", "colour": "red"}, "colour"),
        (["echo"], "body"),
    ],
)
async def test_malformed_envelope_is_400_naming_the_field(post: Poster, body: object, field: str) -> None:
    status, reply = await post(body)
    assert status == 400
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_argument"
    assert reply["error"]["field"] == field


async def test_body_that_is_not_json_is_400_field_body(post: Poster) -> None:
    status, reply = await post(raw=b"{not json")
    assert (status, reply["error"]["field"]) == (400, "body")
    status, reply = await post(raw=b"")
    assert (status, reply["error"]["field"]) == (400, "body")


async def test_unknown_verb_is_400_with_close_matches(post: Poster, bus: FakeBus) -> None:
    status, reply = await post({"command": "listVirtualMachine"})
    assert status == 400
    assert reply["error"]["code"] == "unknown_command"
    assert reply["error"]["field"] == "command"
    assert "listVirtualMachines" in reply["error"]["message"]
    assert bus.calls == []


async def test_verbs_come_from_the_bus(post: Poster, bus: FakeBus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus, "verbs", lambda: ["echo", "brandNewVerb"])
    status, _ = await post({"command": "listVirtualMachines"})
    assert status == 400
    monkeypatch.setattr(bus, "async_dispatch", _echo_dispatch)
    status, reply = await post({"command": "brandNewVerb"})
    assert (status, reply["result"]) == (200, "brandNewVerb")


async def _echo_dispatch(verb, args, command_id, actor):  # type: ignore[no-untyped-def]
    from moldd.app.bus import CommandReply

    return CommandReply(verb, 1)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Conflict("name web-1 is taken", field="name"), 409, "conflict"),
        (CapacityError("cluster is at its N-1 limit", field="host"), 409, "insufficient_capacity"),
        (PermissionDenied("admins only", field="host"), 403, "permission_denied"),
        (Unavailable("host h2 is unreachable", field="host"), 503, "unavailable"),
        (MolddError("custom", code="custom_code", field="x"), 500, "custom_code"),
    ],
)
async def test_moldd_errors_map_to_status_code_and_field(
    post: Poster, bus: FakeBus, monkeypatch: pytest.MonkeyPatch, error: MolddError, status: int, code: str
) -> None:
    async def refuse(*_: object) -> None:
        raise error

    monkeypatch.setattr(bus, "async_dispatch", refuse)
    got_status, reply = await post({"command": "echo"})
    assert got_status == status
    assert reply == {"ok": False, "error": {"code": code, "message": error.message, "field": error.field}}


async def test_invalid_state_from_the_bus_is_409(post: Poster) -> None:
    status, reply = await post({"command": "startVirtualMachine", "args": {"name": "web-1"}})
    assert status == 409
    assert reply["error"] == {
        "code": "invalid_state",
        "message": "VM web-1 is Running; start needs Stopped",
        "field": "name",
    }


async def test_unexpected_exception_is_500_internal_without_details(post: Poster) -> None:
    status, reply = await post({"command": "explode"})
    assert status == 500
    assert reply["error"]["code"] == "internal"
    assert "secret" not in reply["error"]["message"]
    assert "Traceback" not in reply["error"]["message"]


async def test_client_command_id_is_passed_to_the_bus(post: Poster, bus: FakeBus) -> None:
    body = {"command": "startVirtualMachine", "args": {"name": "web-2"}, "id": "retry-me-1"}
    first = await post(body)
    second = await post(body)
    assert [c.command_id for c in bus.calls] == ["retry-me-1", "retry-me-1"]
    assert first == second  # the fake, like the log, answers a retry with the first outcome
    assert first[1]["result"]["job"]["id"] == "retry-me-1"


async def test_actor_is_the_real_peer_uid_gid_and_pid(post: Poster, bus: FakeBus) -> None:
    await post({"command": "echo", "args": {"a": 1}})
    actor = bus.calls[-1].actor
    assert (actor.uid, actor.gid, actor.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert actor.user == pwd.getpwuid(os.getuid()).pw_name


async def test_unknown_path_and_method_get_json_errors(http: aiohttp.ClientSession) -> None:
    async with http.get("http://moldd/v2/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with http.get("http://moldd/v1/command") as resp:
        assert resp.status == 405
        assert (await resp.json())["ok"] is False


async def test_a_large_body_within_the_limit_is_read_whole(post: Poster) -> None:
    """The body arrives in many socket reads; all of it is parsed (not just the first chunk)."""
    big = "x" * 600_000
    status, reply = await post({"command": "echo", "args": {"blob": big, "n": 1}})
    assert status == 200, reply
    assert reply["result"]["args"] == {"blob": big, "n": 1}


async def test_a_chunked_body_over_the_limit_is_refused_naming_the_body(http: aiohttp.ClientSession) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b" " * 100_000

    async with http.post(
        "http://moldd/v1/command", data=chunks(), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status in (400, 413)
        assert (await resp.json())["error"]["field"] == "body"
