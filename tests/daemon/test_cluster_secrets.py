"""The secrets of a cluster (API secret keys, a VM's VNC password) on two real moldd processes with separate state
directories, one real PostgreSQL and the real lab hosts: a standby that never had a copy checks signed requests,
and once it took over from a killed leader it restarts the HA VM with its VNC password and takes signed writes;
a user created by the new leader works on the old one (now a standby). Neither the log's rows nor an export of
it hold any secret. A node whose role may not create the shared table refuses to start, saying what to run."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest

from moldd.api.cloudstack.signing import sign
from moldd.cli.audit import main as audit_main
from moldlab.testing.cluster import REPO, Node, make_nodes
from moldlab.testing.pgserver import PgServer
from tests.daemon.test_ha import qemu_pid, running_copies

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]
_n = itertools.count(1)
VNC = "Xk4vB9qZ"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def nodes(
    tmp_path: Path, clean_lab: Any, guest_image: Any, pg_server: PgServer
) -> AsyncIterator[Callable[..., tuple[list[Node], dict[str, int], str]]]:
    made: list[Node] = []

    def make(names: list[str], dsn: str | None = None) -> tuple[list[Node], dict[str, int], str]:
        schema = f"secrets{os.getpid()}_{next(_n)}"
        ports = {name: free_port() for name in names}

        def sections(name: str, root: Path) -> dict[str, dict[str, Any]]:
            # each node's own state directory: a file-kept secret could not be seen by the other node
            return {
                "cloudstack": {
                    "port": ports[name], "bind": "127.0.0.1", "secrets_file": str(root / "state" / "api-secrets.json"),
                    "rate_per_s": 1000.0, "rate_burst": 10000,
                }
            }  # fmt: skip

        made_now = make_nodes(
            tmp_path, names, clean_lab.hosts, guest_image, dsn or pg_server.dsn(), schema, sections=sections
        )
        made.extend(made_now)
        return made_now, ports, schema

    yield make
    for node in made:
        node.stop()


async def cs_call(port: int, apikey: str, secret: str, command: str, **params: str) -> tuple[int, Any]:
    p = {"command": command, "apiKey": apikey, "response": "json", **params}
    p["signature"] = sign(p, secret)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/client/api?{urlencode(p)}") as r:
            return r.status, await r.json(content_type=None)


async def until_accepted(port: int, apikey: str, secret: str, command: str, **params: str) -> Any:
    """The standby picks a new user's secret up once it folded the user's event (a poll of that condition)."""
    async with asyncio.timeout(60):
        while True:
            status, body = await cs_call(port, apikey, secret, command, **params)
            if status == 200:
                return body
            # not known yet (401), not the leader yet (432/503), or refusals throttled (429)
            assert status in (401, 429, 432, 503), (status, body)
            await asyncio.sleep(0.1)  # a poll of the condition


async def log_bytes(pg: PgServer, schema: str) -> bytes:
    """Every byte of every row of the log's tables (events, commands, meta, epochs, snapshots)."""
    conn = await asyncpg.connect(pg.dsn())
    try:
        out = []
        for table in ("events", "commands", "meta", "epochs", "snapshots"):
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{schema}".{table} t')
            out += [r["row"].encode() for r in rows]
        return b"\n".join(out)
    finally:
        await conn.close()


async def test_a_standby_with_no_copy_of_the_secrets_checks_signatures_and_restarts_vms_with_them(
    nodes: Any, pg_server: PgServer, clean_lab: Any
) -> None:
    (n1, n2), ports, schema = nodes(["n1", "n2"])
    n1.start()
    await n1.async_wait(role="leader", acting=True)
    n2.start()
    await n2.async_wait(role="standby", leader="n1")
    async with n1.client() as c1:
        alice = (await c1.call("createUser", username="alice", role="admin"))["result"]["user"]
        job = await c1.job(
            "deployVirtualMachine", template="tiny", offering="small", ha=True, details={"vnc_password": VNC},
            timeout=120,
        )  # fmt: skip
        assert job["status"] == "succeeded", job
        vm = await c1.vm(job["vm"])
        assert (await c1.call("getVirtualMachineConsole", id=vm["name"]))["result"]["vnc"]["password"] == VNC
    key, secret = alice["apikey"], alice["secretkey"]
    # no secret file of n1 is on n2's side: its state directory has none
    assert not (n2.root / "n2" / "state" / "api-secrets.json").exists()
    # n2, a standby that never had a copy, checks alice's signature (a read)
    listed = await until_accepted(ports["n2"], key, secret, "listVirtualMachines")
    assert [v["name"] for v in listed["listvirtualmachinesresponse"]["virtualmachine"]] == [vm["name"]]
    status, _ = await cs_call(ports["n2"], key, "not-the-secret", "listVirtualMachines")
    assert status == 401

    # the leader dies, and so does the HA VM's QEMU: n2 takes over and restarts it with its VNC password
    pid = qemu_pid(clean_lab, vm["host"], vm["internal_name"])
    n1.kill()
    os.kill(pid, signal.SIGKILL)
    await n2.async_wait(role="leader", acting=True, epoch=2, timeout=60)
    async with n2.client() as c2:
        async with asyncio.timeout(120):
            while not await c2.events(vm["name"], type="ha.restart.succeeded"):
                await asyncio.sleep(0.1)  # a poll of the condition
        again = await c2.wait_vm(vm["name"], timeout=60, state="Running")
        assert running_copies(clean_lab, vm["internal_name"]) == [again["host"]]
        console = (await c2.call("getVirtualMachineConsole", id=vm["name"]))["result"]
        assert console["vnc"]["password"] == VNC  # the domain n2 defined has it (no open VNC)
    # alice's signed write is taken by the new leader
    made = await until_accepted(ports["n2"], key, secret, "createInstanceGroup", name="after-takeover")
    assert made["createinstancegroupresponse"]["instancegroup"]["name"] == "after-takeover"

    # a user created by the new leader works on the old one, restarted as a standby
    n1.start()
    await n1.async_wait(role="standby", leader="n2", timeout=60)
    async with n2.client() as c2:
        bob = (await c2.call("createUser", username="bob", role="readonly"))["result"]["user"]
    await until_accepted(ports["n1"], bob["apikey"], bob["secretkey"], "listVirtualMachines")
    status, _ = await cs_call(ports["n1"], key, secret, "createInstanceGroup", name="on-a-standby")
    assert status != 200  # a standby refuses writes, whoever signs them

    # no secret is in the log, nor in an export of it
    secrets_ = [VNC, secret, bob["secretkey"]]
    raw = await log_bytes(pg_server, schema)
    for s in secrets_:
        assert s.encode() not in raw
    out = io.StringIO()
    with redirect_stdout(out):
        code = await asyncio.to_thread(audit_main, ["export", pg_server.dsn(), "--schema", schema, "--format", "jsonl"])
    assert code == 0 and out.getvalue()
    for s in secrets_:
        assert s not in out.getvalue()


async def test_a_node_that_may_not_create_the_shared_secrets_table_refuses_to_start(
    nodes: Any, pg_server: PgServer, tmp_path: Path
) -> None:
    """The log is initialised by its owner with the daemon role's GRANTs (pg-init --grant); the secrets table is
    not there and the daemon's role may not create it: the start is refused, naming the statements to run; once
    the owner ran them, the node starts and leads."""
    schema = f"secrets{os.getpid()}_{next(_n)}"
    role = f"moldd_limited_{os.getpid()}_{next(_n)}"
    pg_server.psql(f"CREATE ROLE {role} LOGIN")
    init = subprocess.run(
        [sys.executable, "-m", "events", "pg-init", pg_server.dsn(), "--schema", schema, "--grant", role],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    limited = pg_server.dsn(user=role)
    (n1,), _, _ = nodes(["n1"], dsn=limited)
    text = n1.config_path.read_text()
    n1.config_path.write_text(text.replace(f'schema = "{_schema_of(text)}"', f'schema = "{schema}"'))
    n1.start()
    assert n1.proc is not None
    code = await asyncio.to_thread(n1.proc.wait, 120)
    said = n1.log.read_text()
    assert code == 2, said
    assert f"the shared secrets table {schema}.moldd_secrets is missing" in said
    assert f'GRANT SELECT, INSERT, DELETE ON "{schema}".moldd_secrets TO "{role}"' in said
    admin = await asyncpg.connect(pg_server.dsn())
    try:
        for stmt in said.split("as the schema's owner run:", 1)[1].split(";")[:3]:
            await admin.execute(stmt.strip())
    finally:
        await admin.close()
    n1.start()
    await n1.async_wait(role="leader", acting=True, timeout=120)


def _schema_of(config_text: str) -> str:
    for line in config_text.splitlines():
        if line.startswith("schema = "):
            return line.split('"')[1]
    raise AssertionError("no schema in the config")
