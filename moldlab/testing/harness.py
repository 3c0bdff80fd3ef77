"""Run a real moldd daemon against lab hosts, and talk to it over its real Unix socket (tests, bench, demo)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from moldd.config import Config, load_config
from moldlab.testing.load import scaled


def write_template(path: Path, size: str = "64M") -> Path:
    """A small qcow2 template image (the lab guest runs from its initramfs; the disk is real but unused)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def write_config(
    root: Path,
    hosts: list[Any],
    guest: Any,
    *,
    daemon: dict[str, Any] | None = None,
    ha: dict[str, Any] | None = None,
    max_vms: int = 4,
    checkpoints: bool = False,
    sections: dict[str, dict[str, Any]] | None = None,
    cluster: dict[str, Any] | None = None,
) -> Config:
    """A TOML config for lab hosts (``hosts``: LabHost objects) and the lab guest image."""
    root.mkdir(parents=True, exist_ok=True)
    template = write_template(root / "images" / "tiny.qcow2")
    iso = root / "images" / "empty.iso"
    if not iso.exists():
        iso.write_bytes(b"\0" * 2048 * 16)
    d = {
        "socket": str(root / "moldd.sock"),
        "database": str(root / "log.db"),
        "storage_dir": str(root / "disks"),
        "stop_timeout_s": 5,
        "expunge_delay_s": 3600,
        "log_level": "warning",
    } | (daemon or {})
    h = {"host_down_after_s": 2.0, "backoff_base_s": 0.5, "backoff_cap_s": 4.0} | (ha or {})
    lines = [
        "[daemon]",
        *(f"{k} = {_toml(v)}" for k, v in d.items()),
        "",
        "[ha]",
        *(f"{k} = {_toml(v)}" for k, v in h.items()),
        "",
    ]
    for section, values in (sections or {}).items():  # e.g. {"cloudstack": {"port": 0}}
        lines += [f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in values.items()), ""]
    if cluster:
        lines += ["[cluster]", *(f"{k} = {_toml(v)}" for k, v in cluster.items()), ""]
    if checkpoints:
        lines += [
            "[checkpoints]",
            f'key = "{root}/keys/checkpoint.key"',
            f'file = "{root}/checkpoints.jsonl"',
            "interval_s = 1",
            "",
        ]
    for host in hosts:
        lines += [
            "[[hosts]]",
            f'name = "{host.name}"',
            f'uri = "{host.uri}"',
            'cluster = "c1"',
            f"max_vms = {max_vms}",
            f'migration_uri = "{host.migrate_uri()}"',
            f'fence_command = ["python3", "-m", "moldlab.fence", "--host-dir", "{host.dir}"]',
            "",
        ]
    lines += [
        "[[offerings]]", 'name = "small"', "vcpus = 1", "memory_mib = 128", "dynamic = true", "max_vcpus = 2", "max_memory_mib = 256", "",
        "[[offerings]]", 'name = "medium"', "vcpus = 2", "memory_mib = 192", "",
        "[[templates]]", 'name = "tiny"', 'os_type = "Linux"', f'image = "{template}"', f'kernel = "{guest.kernel}"',
        f'initrd = "{guest.initrd}"', f'cmdline = "{guest.cmdline}"', "",
        "[[isos]]", 'name = "installer"', f'path = "{iso}"', "",
    ]  # fmt: skip
    path = root / "moldd.toml"
    path.write_text("\n".join(lines))
    return load_config(path)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class CommandFailed(Exception):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status} {error.get('code')}: {error.get('message')} (field {error.get('field')})")
        self.status = status
        self.error = error
        self.code = error.get("code")
        self.field = error.get("field")


class Client:
    """A tiny async client of the daemon's socket API."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = str(socket_path)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def raw(
        self, verb: str, args: dict[str, Any] | None = None, command_id: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert self._session is not None
        body: dict[str, Any] = {"command": verb, "args": args or {}}
        if command_id is not None:
            body["id"] = command_id
        async with self._session.post("http://moldd/v1/command", json=body) as resp:
            return resp.status, await resp.json()

    async def call(self, verb: str, command_id: str | None = None, **args: Any) -> dict[str, Any]:
        status, reply = await self.raw(verb, args, command_id)
        if not reply.get("ok"):
            raise CommandFailed(status, reply["error"])
        return reply

    async def job(self, verb: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """Run a long command and wait for its job to end; returns the finished job."""
        reply = await self.call(verb, **args)
        return await self.wait_job(reply["result"]["job"]["id"], timeout)

    async def wait_job(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        timeout = scaled(timeout)  # a limit for a hang, stretched on a busy machine
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = (await self.call("queryAsyncJobResult", jobid=job_id))["result"]["job"]
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(0.1)

    async def vm(self, name: str) -> dict[str, Any]:
        reply = await self.call("listVirtualMachines", id=name, listall=True)
        vm: dict[str, Any] = reply["result"]["virtualmachine"][0]
        return vm

    async def wait_vm(self, name: str, timeout: float = 30.0, **expect: Any) -> dict[str, Any]:
        """Wait until the VM's fields equal ``expect`` (e.g. state="Running", host="host1")."""
        timeout = scaled(timeout)  # a limit for a hang, stretched on a busy machine
        deadline = time.monotonic() + timeout
        while True:
            vm = await self.vm(name)
            if all(vm.get(k) == v for k, v in expect.items()):
                return vm
            if time.monotonic() > deadline:
                got = {k: vm.get(k) for k in expect}
                raise TimeoutError(f"VM {name}: wanted {expect}, still {got} after {timeout} s")
            await asyncio.sleep(0.05)

    async def events_of_stream(self, stream: str) -> list[dict[str, Any]]:
        return list((await self.call("listEvents", stream=stream, limit=10000))["result"]["event"])

    async def wait_host(self, name: str, timeout: float = 30.0, **expect: Any) -> dict[str, Any]:
        timeout = scaled(timeout)  # a limit for a hang, stretched on a busy machine
        deadline = time.monotonic() + timeout
        while True:
            hosts = (await self.call("listHosts"))["result"]["host"]
            host: dict[str, Any] = next(h for h in hosts if h["name"] == name)
            if all(host.get(k) == v for k, v in expect.items()):
                return host
            if time.monotonic() > deadline:
                got = {k: host.get(k) for k in expect}
                raise TimeoutError(f"host {name}: wanted {expect}, still {got} after {timeout} s")
            await asyncio.sleep(0.1)

    async def events(self, vm: str, type: str | None = None) -> list[dict[str, Any]]:
        args: dict[str, Any] = {"vm": vm, "limit": 10000}
        if type:
            args["type"] = type
        return list((await self.call("listEvents", **args))["result"]["event"])


@contextlib.asynccontextmanager
async def running_daemon(config: Config) -> AsyncIterator[Any]:
    from moldd.daemon import Daemon

    daemon = Daemon(config)
    await daemon.async_start()
    try:
        yield daemon
    finally:
        await daemon.async_stop()


async def async_moldctl(socket: Path, *args: str) -> tuple[int, str, str]:
    """Runs the real `moldctl` (a child process) against `socket`: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moldd.cli.moldctl", "--socket", str(socket), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()
