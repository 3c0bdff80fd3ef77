"""Property (hypothesis, against a real daemon process over its socket): N clients send M commands in random
interleavings, with random retries and ids reused for other commands. Every id is executed exactly once, every
reply for an id's first command equals the first reply, a different command under a used id is refused
(409 id_reused), and the log holds exactly one acknowledging event per id."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moldlab.testing.harness import Client

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture
def daemon_process(make_config: Any) -> Iterator[Any]:
    import subprocess

    config = make_config()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moldd.daemon", "--config", str(config.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def ready() -> None:
        for _ in range(600):
            try:
                async with Client(config.socket) as c:
                    await c.call("listHosts")
                    return
            except Exception:
                await asyncio.sleep(0.1)
        raise AssertionError("the daemon did not come up")

    try:
        asyncio.run(ready())
        yield config
    finally:
        proc.terminate()
        proc.wait(30)


# One send: (client, command index, variant). Variant 0 is the command itself; 1 is another command under the
# same id (other args), which must be refused once the id is bound — or, sent first, binds the id itself.
sends = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 5), st.sampled_from([0, 0, 0, 1])), min_size=1, max_size=40
)


async def scenario(socket: Path, plan: list[tuple[int, int, int]]) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"p-{tag}-{k}" for k in range(6)]

    def command(k: int, variant: int) -> tuple[str, dict[str, Any]]:
        return "createInstanceGroup", {"name": f"g-{tag}-{k}-{variant}"}

    clients = [Client(socket) for _ in range(4)]
    for c in clients:
        await c.__aenter__()
    try:
        per_client: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for client, k, variant in plan:
            per_client[client].append((k, variant))

        async def run(client: int) -> list[tuple[int, int, int, dict[str, Any]]]:
            out = []
            for k, variant in per_client[client]:
                verb, args = command(k, variant)
                status, reply = await clients[client].raw(verb, args, ids[k])
                out.append((k, variant, status, reply))
                await asyncio.sleep(0)
            return out

        results = [r for rs in await asyncio.gather(*(run(c) for c in per_client)) for r in rs]
        by_id: dict[int, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
        for k, variant, status, reply in results:
            by_id[k].append((variant, status, reply))
        events = (await clients[0].call("listEvents", limit=10000, type="group.created"))["result"]["event"]
        for k, replies in by_id.items():
            winners = {v for v, status, _ in replies if status == 200}
            assert len(winners) == 1, replies  # one binding won the id
            (winner,) = winners
            firsts = [r for v, s, r in replies if v == winner]
            assert all(r["ok"] for r in firsts), firsts
            assert len({r["position"] for r in firsts}) == 1, firsts
            assert len({r["result"]["group"]["name"] for r in firsts}) == 1, firsts
            assert sum(1 for r in firsts if not r["result"].get("duplicate")) <= 1
            for v, status, reply in replies:
                if v != winner:
                    assert status == 409 and reply["error"]["code"] == "id_reused", reply
            acks = [e for e in events if e["command_id"] == ids[k]]
            assert len(acks) == 1, acks
            assert acks[0]["payload"]["name"] == command(k, winner)[1]["name"]
            assert acks[0]["position"] == firsts[0]["position"]
        untouched = {k for k in range(6)} - set(by_id)
        assert not [e for e in events if e["command_id"] in {ids[k] for k in untouched}]
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)
@given(plan=sends)
@pytest.mark.timeout(900)
def test_every_id_runs_exactly_once(daemon_process: Any, plan: list[tuple[int, int, int]]) -> None:
    asyncio.run(scenario(daemon_process.socket, plan))
