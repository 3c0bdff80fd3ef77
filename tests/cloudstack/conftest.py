"""A real moldd daemon on the lab hosts with its CloudStack TCP listener on, and users made through moldctl's verbs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cs import CloudStack

from moldlab.testing.harness import Client, running_daemon
from tests.daemon.conftest import clean_lab, make_config  # noqa: F401  (fixtures)


@dataclass
class CsLab:
    daemon: Any
    client: Client  # moldd's own socket API (as root: admin)
    endpoint: str
    keys: dict[str, tuple[str, str]]  # role -> (apikey, secret)

    def cs(self, role: str = "admin", **kw: Any) -> CloudStack:
        key, secret = self.keys[role]
        return CloudStack(endpoint=self.endpoint, key=key, secret=secret, poll_interval=0.2, job_timeout=180,
                          timeout=60, **kw)  # fmt: skip

    async def wait_guest_ready(self, vm_id: str, timeout: float = 120.0) -> None:
        """Until the guest's kernel is up (its console shows the lab guest's marker): a graceful reboot or stop
        needs a guest that answers ACPI."""
        import time
        from pathlib import Path

        from moldlab import GUEST_READY_MARKER
        from moldlab.testing.load import scaled

        vm = (await self.client.call("listVirtualMachines", id=vm_id))["result"]["virtualmachine"][0]
        log = Path(vm["root_disk"]["path"]).parent / "console.log"
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if log.exists() and GUEST_READY_MARKER in log.read_text(errors="replace"):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{GUEST_READY_MARKER} not on the console of {vm_id}")

    async def call(self, who: str, command: str, **params: Any) -> Any:
        """A ``cs`` call as user ``who`` in a worker thread (``cs`` is synchronous; the daemon runs on this loop)."""
        api = self.cs(who)
        return await asyncio.to_thread(lambda: getattr(api, command)(**params))


@pytest.fixture
def cs_config(make_config: Callable[..., Any]) -> Any:  # noqa: F811
    return make_config(sections={"cloudstack": {"port": 0, "rate_per_s": 1000.0, "rate_burst": 10000}})


@pytest.fixture
async def cs_lab(cs_config: Any) -> AsyncIterator[CsLab]:
    async with running_daemon(cs_config) as daemon, Client(cs_config.socket) as client:
        keys = {}
        for role in ("admin", "operator", "readonly"):
            user = (await client.call("createUser", username=f"{role}-user", role=role))["result"]["user"]
            keys[role] = (user["apikey"], user["secretkey"])
        endpoint = f"http://127.0.0.1:{daemon.cloudstack_tcp.port}/client/api"
        yield CsLab(daemon, client, endpoint, keys)
