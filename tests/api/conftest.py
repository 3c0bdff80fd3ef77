"""A fake in-memory CommandBus and a real server on a temporary Unix socket.

The fake is just enough application to exercise the adapter: it lists VMs, runs start/deploy as jobs
whose events land in a log the server streams, and refuses with MolddErrors.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from moldd.api import ApiServer, ApiSettings, async_serve
from moldd.app.bus import Actor, CommandReply
from moldd.domain.errors import InvalidState, NotFound, ValidationError


@dataclass
class Call:
    verb: str
    args: Mapping[str, Any]
    command_id: str | None
    actor: Actor


@dataclass
class FakeBus:
    ok: bool = True
    step_s: float = 0.05
    outcome_before_event_s: float = 0.0  # > 0: a job's end is visible to a poll this long before its event
    calls: list[Call] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self.following = asyncio.Event()  # set once a follower is waiting for entries (tests sync on it)
        self.release = asyncio.Event()  # lets every waiting ``slowEcho`` answer
        self._ids = itertools.count(1)
        for name, state, group in [
            ("web-1", "Running", "web"),
            ("web-2", "Stopped", "web"),
            ("db-1", "Running", "db"),
        ]:
            self.vms[name] = {"name": name, "display_name": name.upper(), "state": state, "host": "h1",
                              "group": group, "ha_enabled": name == "db-1"}  # fmt: skip

    def verbs(self) -> list[str]:
        return ["listVirtualMachines", "startVirtualMachine", "stopVirtualMachine", "deployVirtualMachine",
                "queryAsyncJobResult", "listHosts", "listEvents", "explode", "echo", "createInstanceGroup",
                "updateVirtualMachine", "slowEcho", "disconnect"]  # fmt: skip

    def health(self) -> dict[str, Any]:
        return {"ok": self.ok, "watchers": "up" if self.ok else "down", "position": len(self.log)}

    async def _append(self, stream: str, event_type: str, payload: dict[str, Any], *,
                      command_id: str | None = None, correlation_id: str | None = None) -> int:  # fmt: skip
        async with self._changed:
            position = len(self.log) + 1
            self.log.append({"position": position, "stream_id": stream, "event_type": event_type,
                             "payload": payload, "command_id": command_id, "correlation_id": correlation_id})  # fmt: skip
            self._changed.notify_all()
            return position

    async def async_follow(self, from_position: int, **_filters: Any) -> AsyncIterator[dict[str, Any]]:
        position = from_position
        self.following.set()
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda p=position: len(self.log) >= p)  # type: ignore[misc]
                batch = self.log[position - 1 :]
            for entry in batch:
                yield entry
            position += len(batch)

    async def async_dispatch(self, verb: str, args: Mapping[str, Any], command_id: str | None,
                             actor: Actor) -> CommandReply:  # fmt: skip
        self.calls.append(Call(verb, dict(args), command_id, actor))
        if verb == "explode":
            raise RuntimeError("secret internal detail")
        if verb == "disconnect":  # what a lost peer connection looks like to the API
            raise ConnectionResetError("peer went away")
        if verb == "slowEcho":  # suspends until its ``release`` event (tests/api/test_api_lane.py) is set
            await self.release.wait()
            return CommandReply({"args": dict(args), "id": command_id, "actor": str(actor)}, len(self.log))
        if verb == "echo":
            return CommandReply({"args": dict(args), "id": command_id, "actor": str(actor)}, len(self.log))
        if verb == "listVirtualMachines":
            rows = [vm for vm in self.vms.values()
                    if all(vm.get(k) == args[k] for k in ("name", "group", "state") if k in args)]  # fmt: skip
            return CommandReply({"count": len(rows), "virtualmachine": rows}, len(self.log))
        if verb == "createInstanceGroup":
            return CommandReply({"group": {"name": args.get("name"), "description": "", "vms": []}}, 1)
        if verb == "updateVirtualMachine":
            vm = self.vms[str(args["name"])]
            vm.update(display_name=args.get("displayname", vm["display_name"]))
            return CommandReply({"vm": dict(vm, offering={"name": "small", "vcpus": 1}),
                                 "changed": {"display_name": vm["display_name"]}}, 1)  # fmt: skip
        if verb == "listHosts":
            return CommandReply(
                {"count": 1, "host": [{"name": "h1", "state": "Up", "vms": len(self.vms)}]}, 0
            )
        if verb == "queryAsyncJobResult":
            job = self.jobs.get(str(args.get("jobid")))
            if job is None:
                raise NotFound(f"no job {args.get('jobid')!r}", field="jobid")
            return CommandReply({"job": dict(job)}, len(self.log))
        if verb in ("startVirtualMachine", "deployVirtualMachine"):
            return await self._start_job(verb, args, command_id)
        raise ValidationError(f"{verb} is not supported by the fake", field="command")

    async def _start_job(self, verb: str, args: Mapping[str, Any], command_id: str | None) -> CommandReply:
        name = str(args.get("name") or f"vm-{next(self._ids)}")
        if verb == "startVirtualMachine":
            if name not in self.vms:
                raise NotFound(f"no VM named {name!r}", field="name")
            if self.vms[name]["state"] == "Running":
                raise InvalidState(f"VM {name} is Running; start needs Stopped", field="name")
        job_id = command_id or f"job-{next(self._ids)}"
        if job_id in self.jobs:  # idempotent retry
            return CommandReply({"job": dict(self.jobs[job_id])}, self.jobs[job_id]["position"])
        position = await self._append(f"vm-{name}", "vm.start.requested", {"vm": name},
                                      command_id=job_id, correlation_id=job_id)  # fmt: skip
        self.jobs[job_id] = {"id": job_id, "status": "pending", "vm": name, "state": "Starting",
                             "position": position}  # fmt: skip
        fail = args.get("template") == "broken"
        task = asyncio.get_running_loop().create_task(self._run_job(job_id, name, fail))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return CommandReply({"job": dict(self.jobs[job_id])}, position)

    async def _run_job(self, job_id: str, name: str, fail: bool) -> None:
        job = self.jobs[job_id]
        await asyncio.sleep(self.step_s)
        job["status"] = "running"
        await self._append(f"vm-{name}", "vm.start.started", {"state": "Starting", "host": "h1"},
                           correlation_id=job_id)  # fmt: skip
        await asyncio.sleep(self.step_s)
        if fail:
            await self._append(f"vm-{name}", "vm.start.failed", {"state": "Stopped", "error": "disk missing",
                               "job_status": "failed"}, correlation_id=job_id)  # fmt: skip
            job.update(status="failed", state="Stopped",
                       error={"code": "operation_failed", "message": "qemu: disk missing", "field": None})  # fmt: skip
        else:
            ended = {"state": "Running", "host": "h1", "job_status": "succeeded"}
            if self.outcome_before_event_s:  # the job's end is visible to a poll before its event is appended
                job.update(status="succeeded", state="Running", result={"name": name, "state": "Running"})
                await asyncio.sleep(self.outcome_before_event_s)
            await self._append(f"vm-{name}", "vm.started", ended, correlation_id=job_id)
            self.vms.setdefault(name, {"name": name, "group": None})["state"] = "Running"
            job.update(status="succeeded", state="Running", result={"name": name, "state": "Running"})

    async def async_close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="moldd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def bus() -> AsyncIterator[FakeBus]:
    fake = FakeBus()
    yield fake
    await fake.async_close()


@pytest.fixture
async def server(bus: FakeBus, sock_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await async_serve(bus, sock_dir / "moldd.sock", settings=ApiSettings(heartbeat_s=0.2),
                            use_socket_activation=False)  # fmt: skip
    yield srv
    await srv.async_close()


@pytest.fixture
async def http(server: ApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    assert server.path is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=server.path)) as session:
        yield session


class Poster:
    """``await post(body)`` → ``(status, decoded reply)`` for ``POST /v1/command``."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def __call__(self, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = (
            {"data": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": body}
        )
        async with self.http.post("http://moldd/v1/command", **kwargs) as resp:
            return resp.status, await resp.json()


@pytest.fixture
def post(http: aiohttp.ClientSession) -> Poster:
    return Poster(http)
