"""What the CloudStack endpoint refuses, and how: always a CloudStack error object with CloudStack's HTTP status,
never a 500; refusals of signed users are audited in the log; secrets never reach the log."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from cs import CloudStackApiException

from moldd.api.cloudstack.signing import sign
from moldd.app.bus import Actor
from moldd.domain.errors import PermissionDenied
from moldlab.testing.harness import Client, running_daemon
from tests.cloudstack.conftest import CsLab

pytestmark = pytest.mark.libvirt


async def raw(lab: CsLab, method: str = "GET", query: str = "", body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
    async with aiohttp.ClientSession() as s:
        url = lab.endpoint + (f"?{query}" if query else "")
        async with s.request(method, url, data=body, headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None)


def signed_query(lab: CsLab, role: str, **params: str) -> str:
    from urllib.parse import urlencode

    key, secret = lab.keys[role]
    p = {"apiKey": key, "response": "json", **params}
    p["signature"] = sign(p, secret)
    return urlencode(p)


def assert_cs_error(status: int, body: dict[str, Any], code: int, key: str | None = None) -> dict[str, Any]:
    assert status == code, body
    (only_key,) = body
    if key is not None:
        assert only_key == key
    err = body[only_key]
    assert err["errorcode"] == code and isinstance(err["cserrorcode"], int) and err["errortext"]
    return dict(err)


async def test_wrong_signature_expired_and_unsigned_are_401(cs_lab: CsLab) -> None:
    api = cs_lab.cs("operator")
    api.secret = "not-the-secret"
    with pytest.raises(CloudStackApiException) as bad:
        await asyncio.to_thread(api.listVirtualMachines)
    assert bad.value.response.status_code == 401 and bad.value.error["errorcode"] == 401
    # An expired request (cs signs the expires it is given), correctly signed otherwise.
    with pytest.raises(CloudStackApiException) as expired:
        await cs_lab.call("operator", "listVirtualMachines", signatureVersion="3", expires="2020-01-01T00:00:00+0000")
    assert expired.value.response.status_code == 401
    # Replayable for days: refused as well.
    with pytest.raises(CloudStackApiException) as far:
        await cs_lab.call("operator", "listVirtualMachines", signatureVersion="3", expires="2099-01-01T00:00:00+0000")
    assert far.value.response.status_code == 401
    # Unsigned, key without signature, unknown key: 401 over TCP.
    status, body = await raw(cs_lab, query="command=listVirtualMachines&response=json")
    assert_cs_error(status, body, 401, "listvirtualmachinesresponse")
    key = cs_lab.keys["operator"][0]
    status, body = await raw(cs_lab, query=f"command=listZones&response=json&apiKey={key}")
    assert_cs_error(status, body, 401)
    status, body = await raw(cs_lab, query=signed_query(cs_lab, "operator", command="listZones").replace(key, "x" + key[1:]))
    assert_cs_error(status, body, 401)
    # A request signed right but changed on the way (another VM id) is refused.
    query = signed_query(cs_lab, "operator", command="stopVirtualMachine", id="a")
    status, body = await raw(cs_lab, query=query.replace("id=a", "id=b"))
    assert_cs_error(status, body, 401)


async def test_readonly_stop_is_refused_and_audited(cs_lab: CsLab) -> None:
    vm = (await cs_lab.client.job("deployVirtualMachine", template="tiny", offering="small"))["vm"]
    vm_id = (await cs_lab.client.vm(vm))["uuid"]
    with pytest.raises(CloudStackApiException) as refused:
        await cs_lab.call("readonly", "stopVirtualMachine", id=vm_id)
    err = refused.value.error
    assert refused.value.response.status_code == 432 and err["errorcode"] == 432 and err["cserrorcode"] == 4365
    assert "readonly" in err["errortext"]
    assert (await cs_lab.client.vm(vm))["state"] == "Running"
    audit = await cs_lab.client.events_of_stream("access")
    assert audit[-1]["event_type"] == "access.denied"
    assert audit[-1]["payload"]["verb"] == "stopVirtualMachine" and audit[-1]["payload"]["user"] == "readonly-user"
    assert audit[-1]["actor"] == "user=readonly-user via=apikey role=readonly"
    # listApis shows a readonly user only what it may call.
    apis = {a["name"] for a in (await cs_lab.call("readonly", "listApis"))["api"]}
    assert "listVirtualMachines" in apis and "stopVirtualMachine" not in apis and "createUser" not in apis
    admin_apis = {a["name"]: a for a in (await cs_lab.call("admin", "listApis"))["api"]}
    assert {"stopVirtualMachine", "migrateVirtualMachine", "createUser"} <= set(admin_apis)
    # parameters (what CloudMonkey's sync reads), with the required ones marked
    deploy = {p["name"]: p["required"] for p in admin_apis["deployVirtualMachine"]["params"]}
    assert deploy["serviceofferingid"] and deploy["templateid"] and not deploy["zoneid"] and not deploy["name"]
    assert admin_apis["deployVirtualMachine"]["isasync"] and not admin_apis["listZones"]["isasync"]


async def test_socket_actor_roles_are_enforced_by_the_app(cs_lab: CsLab) -> None:
    app = cs_lab.daemon.app
    with pytest.raises(PermissionDenied):
        await app.async_dispatch("confirmHostFenced", {"host": "host0"}, None,
                                 Actor(uid=4242, gid=4242, pid=1, user="ops", role="operator"))  # fmt: skip
    reply = await app.async_dispatch("listHosts", {}, None, Actor(uid=4242, gid=4242, pid=1, role="readonly"))
    assert reply.result["count"] == 2
    audit = await cs_lab.client.events_of_stream("access")
    assert audit[-1]["payload"] | {"reason": ""} == {
        "verb": "confirmHostFenced", "user": "ops", "uid": 4242, "role": "operator", "required": "admin",
        "via": "socket", "reason": "",
    }  # fmt: skip


async def test_client_api_on_the_unix_socket_uses_peer_roles_or_keys(cs_lab: CsLab) -> None:
    sock = str(cs_lab.daemon.config.socket)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        async with s.get("http://moldd/client/api?command=listZones&response=json") as resp:
            assert resp.status == 200  # the test runs as root: an admin on the socket
            assert (await resp.json())["listzonesresponse"]["count"] == 1
        async with s.get("http://moldd/client/api?" + signed_query(cs_lab, "readonly", command="stopVirtualMachine",
                                                                  id="whatever")) as resp:  # fmt: skip
            assert resp.status == 432  # signed: the key's user and role, not the peer's
        async with s.get("http://moldd/client/api?command=listZones&response=json&apiKey=nope&signature=x") as resp:
            assert resp.status == 401


async def test_users_revoke_and_rekey(cs_lab: CsLab) -> None:
    c = cs_lab.client
    created = (await c.call("createUser", username="temp", role="operator"))["result"]["user"]
    cs_lab.keys["temp"] = (created["apikey"], created["secretkey"])
    assert (await cs_lab.call("temp", "listZones"))["count"] == 1
    new = (await c.call("registerUserKeys", username="temp"))["result"]["userkeys"]
    with pytest.raises(CloudStackApiException) as old:
        await cs_lab.call("temp", "listZones")
    assert old.value.response.status_code == 401
    cs_lab.keys["temp"] = (new["apikey"], new["secretkey"])
    assert (await cs_lab.call("temp", "listZones"))["count"] == 1
    await c.call("revokeUser", username="temp", reason="left the team")
    with pytest.raises(CloudStackApiException) as revoked:
        await cs_lab.call("temp", "listZones")
    assert revoked.value.response.status_code == 401
    users = {u["name"]: u for u in (await c.call("listUsers"))["result"]["user"]}
    assert users["temp"]["state"] == "revoked" and "secretkey" not in users["temp"]
    # Only admins manage users.
    with pytest.raises(CloudStackApiException) as refused:
        await cs_lab.call("operator", "createUser", username="x", role="admin")
    assert refused.value.response.status_code == 432
    # Nothing secret reached the log; the secrets file is 0600.
    secrets = [s for _, s in cs_lab.keys.values()] + [created["secretkey"], new["secretkey"]]
    log = cs_lab.daemon.config.database.read_bytes()
    wal = cs_lab.daemon.config.database.with_name(cs_lab.daemon.config.database.name + "-wal")
    log += wal.read_bytes() if wal.exists() else b""
    assert not [s for s in secrets if s.encode() in log]
    assert created["apikey"].encode() in log  # the key id is recorded (it identifies the user)
    secrets_file = cs_lab.daemon.config.database.parent / "api-secrets.json"
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600


async def test_user_input_is_checked(cs_lab: CsLab) -> None:
    c = cs_lab.client
    for args, field in [({"username": "bad name", "role": "admin"}, "username"),
                        ({"username": "x" * 65}, "username"),
                        ({"username": "ok", "role": "root"}, "role"),
                        ({"username": "admin-user"}, "username")]:  # fmt: skip
        status, reply = await c.raw("createUser", args)
        assert status in (400, 409) and reply["error"]["field"] == field, (args, reply)
    status, reply = await c.raw("revokeUser", {"username": "nobody"})
    assert status == 404


BAD_REQUESTS: list[tuple[str, Callable[[CsLab], dict[str, Any]], int]] = [
    ("invalid utf-8", lambda lab: {"query": signed_query(lab, "admin", command="listZones") + "&x=%ff"}, 430),
    ("oversized query", lambda lab: {"query": "command=listZones&x=" + "a" * 70000}, 430),
    ("oversized body", lambda lab: {"method": "POST", "body": b"command=listZones&x=" + b"a" * 70000,
                                    "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 430),
    ("multipart body", lambda lab: {"method": "POST", "body": b"--x--",
                                    "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 430),
    ("PUT", lambda lab: {"method": "PUT", "query": "command=listZones"}, 430),
    ("NUL", lambda lab: {"query": "command=list%00Zones"}, 430),
    ("unknown command", lambda lab: {"query": signed_query(lab, "admin", command="launchRocket")}, 432),
    ("no command", lambda lab: {"query": signed_query(lab, "admin")}, 431),
    ("xml", lambda lab: {"query": signed_query(lab, "admin", command="listZones", response="xml")}, 431),
    ("bad pagesize", lambda lab: {"query": signed_query(lab, "admin", command="listHosts", pagesize="x")}, 431),
    ("page 0", lambda lab: {"query": signed_query(lab, "admin", command="listHosts", pagesize="1", page="0")}, 431),
    ("unknown vm uuid", lambda lab: {"query": signed_query(lab, "admin", command="stopVirtualMachine",
                                                           id="00000000-0000-0000-0000-000000000000")}, 431),
    ("unknown template", lambda lab: {"query": signed_query(lab, "admin", command="deployVirtualMachine",
                                                            templateid="00000000-0000-0000-0000-000000000000",
                                                            serviceofferingid="small")}, 431),
    ("missing template", lambda lab: {"query": signed_query(lab, "admin", command="deployVirtualMachine")}, 431),
    ("bad filter", lambda lab: {"query": signed_query(lab, "admin", command="listTemplates", templatefilter="x")}, 431),
    ("bad state", lambda lab: {"query": signed_query(lab, "admin", command="listVirtualMachines", state="Nope")}, 431),
    ("resize bad size", lambda lab: {"query": signed_query(lab, "admin", command="resizeVolume", id="x", size="-1")}, 431),
    ("getUserKeys", lambda lab: {"query": signed_query(lab, "admin", command="getUserKeys", id="x")}, 432),
]  # fmt: skip


@pytest.mark.parametrize("name", [b[0] for b in BAD_REQUESTS])
async def test_malformed_requests_get_cloudstack_errors_never_500(cs_lab: CsLab, name: str) -> None:
    _, make, code = next(b for b in BAD_REQUESTS if b[0] == name)
    status, body = await raw(cs_lab, **make(cs_lab))
    assert_cs_error(status, body, code)


async def test_request_line_beyond_any_limit_is_a_plain_400(cs_lab: CsLab) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(cs_lab.endpoint + "?command=listZones&x=" + "a" * 300_000) as resp:
            assert resp.status == 400  # aiohttp's own refusal, before any handler: not a 500


async def test_rate_limit_per_key(make_config: Callable[..., Any]) -> None:
    config = make_config(sections={"cloudstack": {"port": 0, "rate_per_s": 0.001, "rate_burst": 3}})
    async with running_daemon(config) as daemon, Client(config.socket) as client:
        user = (await client.call("createUser", username="busy", role="readonly"))["result"]["user"]
        other = (await client.call("createUser", username="calm", role="readonly"))["result"]["user"]
        lab = CsLab(daemon, client, f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api",
                    {"busy": (user["apikey"], user["secretkey"]), "calm": (other["apikey"], other["secretkey"])})  # fmt: skip
        for _ in range(3):
            assert (await lab.call("busy", "listZones"))["count"] == 1
        with pytest.raises(CloudStackApiException) as limited:
            await lab.call("busy", "listZones")
        assert limited.value.response.status_code == 429 and limited.value.error["cserrorcode"] == 4545
        assert (await lab.call("calm", "listZones"))["count"] == 1  # another key is not slowed down


GARBAGE = ["", "x", "-1", "0", "ü✓", "../../etc/passwd", "00000000-0000-0000-0000-000000000000", "y" * 3000,
           "true", "{\"a\":1}"]  # fmt: skip
PARAMS = ["id", "virtualmachineid", "hostid", "templateid", "serviceofferingid", "zoneid", "name", "displayname",
          "size", "page", "pagesize", "vmsnapshotid", "jobid", "group", "groupid", "state", "keyword", "username",
          "role", "forced", "expunge", "startvm", "rootdisksize", "ostypeid", "templatefilter", "details[0].cpu_model",
          "snapshotmemory", "shrinkok"]  # fmt: skip


async def test_sweep_of_wrong_values_never_gives_an_internal_error(cs_lab: CsLab) -> None:
    """Every command, every parameter it might read, wrong values: CloudStack-shaped answers, no 500, no 530
    "internal error" (an exception that escaped a translator)."""
    from urllib.parse import urlencode

    from moldd.api.cloudstack.commands import COMMANDS

    key, secret = cs_lab.keys["admin"]
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession() as s:
        for spec in COMMANDS.values():
            for i, value in enumerate(GARBAGE):
                params = {"command": spec.name, "apiKey": key, "response": "json"}
                params |= {p: value for p in PARAMS[i % 3 :: 3]}  # a different third of the parameters each time
                params["signature"] = sign(params, secret)
                async with s.post(cs_lab.endpoint, data=urlencode(params),
                                  headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:  # fmt: skip
                    body = await resp.json(content_type=None)
                    seen[resp.status] = seen.get(resp.status, 0) + 1
                    assert resp.status != 500, (spec.name, value, body)
                    (only,) = body.values()
                    assert "internal error" not in str(only.get("errortext", "")), (spec.name, value, body)
                    if resp.status != 200:
                        assert only["errorcode"] == resp.status and only["errortext"]
    assert set(seen) <= {200, 431, 432, 530, 533, 534}, seen  # signed right, never throttled here
    print("status counts", seen)
    assert seen[431] > 100 and seen[200] > 10, seen


async def test_refused_signatures_are_logged_without_secrets(cs_lab: CsLab) -> None:
    from structlog.testing import capture_logs

    _, secret = cs_lab.keys["operator"]
    api = cs_lab.cs("operator")
    api.secret = "wrong-" + secret
    with capture_logs() as logs:
        with pytest.raises(CloudStackApiException):
            await asyncio.to_thread(api.listZones)
        status, _ = await raw(cs_lab, query="command=listZones&response=json")
        assert status == 401
    events = [e["event"] for e in logs]
    assert "cloudstack_bad_signature" in events and "cloudstack_unauthenticated" in events
    bad = next(e for e in logs if e["event"] == "cloudstack_bad_signature")
    assert bad["user"] == "operator-user" and bad["peer"] == "127.0.0.1"
    assert secret not in repr(logs) and "wrong-" not in repr(logs)


async def test_list_events_in_cloudstack_names(cs_lab: CsLab) -> None:
    await cs_lab.call("operator", "createInstanceGroup", name="evt")
    events = (await cs_lab.call("readonly", "listEvents", type="VM.GROUP.CREATE"))["event"]
    assert events and events[0]["state"] == "Completed" and "group-evt" in events[0]["description"]
    assert events[0]["username"] == "user=operator-user via=apikey role=operator"
    newest = (await cs_lab.call("readonly", "listEvents", page=1, pagesize=1))["event"]
    assert len(newest) == 1


async def test_tcp_listener_has_the_socket_apis_time_and_connection_limits(make_config: Callable[..., Any]) -> None:
    config = make_config(sections={"cloudstack": {"port": 0}, "api": {"header_timeout_s": 1.0, "max_connections": 3}})
    async with running_daemon(config) as daemon:
        port = daemon.cloudstack_tcp.port
        # A client that never finishes its headers is cut (408), not held for ever.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /client/api?command=listZones HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
        # Beyond max_connections, a connection is refused at once (503) instead of waiting for a slot.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /client/api HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        for _, w in held:
            w.close()
        assert answer.startswith(b"HTTP/1.1 503")


async def test_a_peer_guessing_signatures_is_slowed_down(make_config: Callable[..., Any]) -> None:
    config = make_config(sections={"cloudstack": {"port": 0}})
    async with running_daemon(config) as daemon, Client(config.socket) as client:
        user = (await client.call("createUser", username="victim", role="admin"))["result"]["user"]
        lab = CsLab(daemon, client, f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api", {})
        statuses = []
        for i in range(40):
            status, body = await raw(lab, query=f"command=listZones&response=json&apiKey={user['apikey']}&signature=guess{i}")
            statuses.append(status)
            (only,) = body.values()
            assert only["errorcode"] == status
        assert statuses[0] == 401 and 429 in statuses and set(statuses) == {401, 429}
