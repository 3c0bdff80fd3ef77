"""moldd's own side of issue 15: moldctl user commands, users across restarts and snapshots, group deletion that
ungroups, UUIDs accepted beside names on the socket API."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack

from moldlab.testing.harness import Client, CommandFailed, running_daemon
from moldlab.testing.harness import async_moldctl as moldctl

pytestmark = pytest.mark.libvirt


async def test_moldctl_user_create_list_keys_revoke(make_config: Any) -> None:
    config = make_config(sections={"cloudstack": {"port": 0}})
    async with running_daemon(config) as daemon:
        sock = config.socket
        code, out, err = await moldctl(sock, "user", "create", "alice", "--role", "operator", "--json")
        assert code == 0, err
        user = json.loads(out)["user"]
        assert user["role"] == "operator" and user["secretkey"] and user["apikey"]
        code, out, _ = await moldctl(sock, "user", "list")
        assert code == 0 and "alice" in out and "operator" in out and user["secretkey"] not in out
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        api = CloudStack(endpoint=endpoint, key=user["apikey"], secret=user["secretkey"])
        assert (await asyncio.to_thread(api.listZones))["count"] == 1
        code, out, _ = await moldctl(sock, "user", "keys", "alice", "--json")
        keys = json.loads(out)["userkeys"]
        assert code == 0 and keys["apikey"] != user["apikey"]
        code, out, _ = await moldctl(sock, "user", "revoke", "alice", "--reason", "left")
        assert code == 0 and "revoked" in out
        code, _, err = await moldctl(sock, "user", "create", "alice")
        assert code == 1 and "already exists" in err
        code, _, err = await moldctl(sock, "user", "create", "bob", "--role", "god")
        assert code == 1 and "role" in err
        async with Client(sock) as c:
            events = await c.events_of_stream("user-alice")
        assert [e["event_type"] for e in events] == ["user.created", "user.keys.registered", "user.revoked"]
        assert all("secret" not in json.dumps(e["payload"]) for e in events)


async def test_users_survive_restart_and_snapshot(make_config: Any) -> None:
    config = make_config(daemon={"snapshot_every": 2}, sections={"cloudstack": {"port": 0}})
    async with running_daemon(config) as daemon, Client(config.socket) as c:
        user = (await c.call("createUser", username="carol", role="readonly"))["result"]["user"]
        for i in range(4):  # enough events for a read-model snapshot after the user
            await c.call("createInstanceGroup", name=f"g{i}")
    async with running_daemon(config) as daemon:
        assert daemon.app.model.users["carol"]["role"] == "readonly"
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        api = CloudStack(endpoint=endpoint, key=user["apikey"], secret=user["secretkey"])
        assert (await asyncio.to_thread(api.listInstanceGroups))["count"] == 4


async def test_a_tampered_secrets_file_is_not_trusted(make_config: Any) -> None:
    config = make_config(sections={"cloudstack": {"port": 0}})
    async with running_daemon(config) as daemon, Client(config.socket) as c:
        user = (await c.call("createUser", username="dave", role="admin"))["result"]["user"]
    secrets_file = config.database.parent / "api-secrets.json"
    data = json.loads(secrets_file.read_text())
    data[user["apikey"]] = "attacker-chosen"
    secrets_file.write_text(json.dumps(data))
    async with running_daemon(config) as daemon:
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        api = CloudStack(endpoint=endpoint, key=user["apikey"], secret="attacker-chosen")
        from cs import CloudStackApiException

        with pytest.raises(CloudStackApiException) as refused:
            await asyncio.to_thread(api.listZones)
        assert refused.value.response.status_code == 401


async def test_group_delete_refuses_unless_ungroup_and_uuid_finds_vms(make_config: Any) -> None:
    config = make_config()
    async with running_daemon(config), Client(config.socket) as c:
        await c.call("createInstanceGroup", name="db")
        reply = await c.call("deployVirtualMachine", template="tiny", offering="small", group="db", startvm=False)
        vm = reply["result"]["vm"]
        with pytest.raises(CommandFailed) as refused:
            await c.call("deleteInstanceGroup", name="db")
        assert refused.value.status == 409
        deleted = (await c.call("deleteInstanceGroup", name="db", ungroup=True))["result"]["group"]
        assert deleted["ungrouped"] == [vm["name"]]
        by_uuid = (await c.call("listVirtualMachines", id=vm["uuid"]))["result"]["virtualmachine"]
        assert by_uuid[0]["name"] == vm["name"] and by_uuid[0]["group"] is None
        for verb, key in [("listZones", "zone"), ("listTemplates", "template"), ("listIsos", "iso"),
                          ("listServiceOfferings", "serviceoffering"), ("listOsTypes", "ostype")]:  # fmt: skip
            items = (await c.call(verb))["result"][key]
            assert items and all(len(i["id"]) == 36 for i in items)


async def test_concurrent_user_creation_loses_no_secret_and_admits_one_per_name(make_config: Any) -> None:
    config = make_config(sections={"cloudstack": {"port": 0}})
    async with running_daemon(config) as daemon, Client(config.socket) as c:
        distinct = await asyncio.gather(*(c.raw("createUser", {"username": f"u{i}", "role": "readonly"}) for i in range(12)))
        same = await asyncio.gather(*(c.raw("createUser", {"username": "dup", "role": "admin"}) for _ in range(8)))
        assert [s for s, _ in distinct] == [200] * 12
        assert sorted(s for s, _ in same) == [200] + [409] * 7
        users = [r["result"]["user"] for _, r in distinct] + [r["result"]["user"] for s, r in same if s == 200]
        secrets = json.loads((config.database.parent / "api-secrets.json").read_text())
        assert len(secrets) == 13 and all(secrets[u["apikey"]] == u["secretkey"] for u in users)
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        for u in users:
            api = CloudStack(endpoint=endpoint, key=u["apikey"], secret=u["secretkey"])
            assert (await asyncio.to_thread(api.listZones))["count"] == 1


async def test_socket_group_member_is_operator_admin_group_member_is_admin(make_config: Any, tmp_path: Path) -> None:
    """Real peers with other uids (setpriv) on the real socket: roles come from the [roles] config."""
    import shutil
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="moldd-roles-"))  # world-traversable, unlike pytest's tmp_path
    try:
        run_dir.chmod(0o755)
        moldctl_py = run_dir / "moldctl.py"  # moldctl is standard-library only: the system python runs it
        shutil.copy(Path(__file__).parents[2] / "moldd" / "cli" / "moldctl.py", moldctl_py)
        moldctl_py.chmod(0o644)
        sock = run_dir / "moldd.sock"
        config = make_config(daemon={"socket": str(sock), "socket_group": "12345"},
                             sections={"roles": {"socket_group_role": "operator", "admin_group": "12347"}})  # fmt: skip

        async def as_uid(uid: int, gid: int, groups: str, *args: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                "setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={groups}", "/usr/bin/python3",
                str(moldctl_py), "--socket", str(sock), *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode()

        async with running_daemon(config), Client(sock) as c:
            code, out = await as_uid(12345, 12345, "12345", "host", "list")
            assert code == 0 and "host0" in out
            code, out = await as_uid(12345, 12345, "12345", "call", "confirmHostFenced", "host=host0")
            assert code == 1 and "role operator may not call confirmHostFenced" in out
            code, out = await as_uid(12345, 12345, "12345", "user", "create", "mallory", "--role", "admin")
            assert code == 1 and "may not call createUser" in out
            # An admin-group member passes the role check; the business rule (the host is Up) decides.
            code, out = await as_uid(12347, 12347, "12345", "call", "confirmHostFenced", "host=host0")
            assert code == 1 and "may not call" not in out and "Up" in out
            # Not in the socket group: the socket file (0660, group 12345) keeps it out (moldctl exit 3).
            code, out = await as_uid(12346, 12346, "12346", "host", "list")
            assert code == 3
            audit = await c.events_of_stream("access")
            who = [(e["payload"]["verb"], e["payload"]["uid"], e["payload"]["role"]) for e in audit]
            assert who == [("confirmHostFenced", 12345, "operator"), ("createUser", 12345, "operator")]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_moldd_verbs_take_catalog_uuids_beside_names(make_config: Any) -> None:
    from moldd.domain.ids import stable_uuid

    config = make_config()
    async with running_daemon(config), Client(config.socket) as c:
        reply = await c.call("deployVirtualMachine", template=stable_uuid("template", "tiny"),
                             offering=stable_uuid("offering", "small"), host=stable_uuid("host", "host1"), startvm=False)  # fmt: skip
        vm = reply["result"]["vm"]
        assert (vm["template"], vm["offering"]["name"], vm["host"]) == ("tiny", "small", "host1")
        with pytest.raises(CommandFailed) as unknown:
            await c.call("deployVirtualMachine", template=stable_uuid("template", "nope"), offering="small")
        assert unknown.value.status == 404 and unknown.value.field == "template"


async def test_acknowledged_user_survives_kill_9(make_config: Any) -> None:
    """createUser answered = the key works, even if the daemon is SIGKILLed right after (the secret is fsynced
    before the event, the event before the reply)."""
    import signal
    import time

    config = make_config(sections={"cloudstack": {"port": 0}})

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moldd.daemon", "--config", str(config.path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                async with Client(config.socket) as c:
                    await c.call("listZones")
                return proc
            except Exception:
                assert time.monotonic() < deadline and proc.returncode is None, "daemon did not come up"
                await asyncio.sleep(0.2)

    proc = await start()
    try:
        async with Client(config.socket) as c:
            users = [(await c.call("createUser", username=f"k{i}", role="readonly"))["result"]["user"] for i in range(3)]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    async with running_daemon(config) as daemon:
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        for u in users:
            api = CloudStack(endpoint=endpoint, key=u["apikey"], secret=u["secretkey"])
            assert (await asyncio.to_thread(api.listZones))["count"] == 1


async def test_metrics_on_the_tcp_listener_need_the_bearer_token(make_config: Any, tmp_path: Path) -> None:
    """GET /metrics is served on the CloudStack TCP listener only with a token file, and only to a client that
    sends that token; a token file others can read is refused before anything starts."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from moldd.config import ConfigError, check_environment, load_config

    token_file = tmp_path / "metrics.token"
    token_file.write_text("s3cr3t-token-for-prometheus\n")
    token_file.chmod(0o644)
    config = make_config(sections={"cloudstack": {"port": 0, "metrics_token_file": str(token_file)}})
    with pytest.raises(ConfigError, match="metrics_token_file"):
        check_environment(load_config(config.path))
    token_file.chmod(0o600)
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/metrics"
        async with http.get(url) as r:
            assert r.status == 401 and (await r.json())["error"]["field"] == "Authorization"
        async with http.get(url, headers={"Authorization": "Bearer wrong-token-wrong-token"}) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": "Bearer s3cr3t-token-for-prometheus"}) as r:
            assert r.status == 200
            names = {f.name for f in text_string_to_metric_families(await r.text())}
        assert "moldd_log_head_position" in names
    plain = make_config(sections={"cloudstack": {"port": 0}})
    async with running_daemon(plain) as daemon, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/metrics") as r:
            assert r.status in (404, 405)
