"""A real moldd daemon per test, on the session's real lab hosts, reached through its real Unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from moldlab.testing.harness import Client, running_daemon, write_config


def wipe_lab(lab: Any) -> None:
    """Leave every lab host running, thawed and without domains (definitions included)."""
    lab.heal(wipe=True)


@pytest.fixture
def clean_lab(lab: Any) -> Iterator[Any]:
    wipe_lab(lab)
    yield lab
    wipe_lab(lab)


@pytest.fixture
def make_config(tmp_path: Path, clean_lab: Any, guest_image: Any) -> Callable[..., Any]:
    def make(**kw: Any) -> Any:
        return write_config(tmp_path / "moldd", clean_lab.hosts, guest_image, **kw)

    return make


@pytest.fixture
def config(make_config: Callable[..., Any]) -> Any:
    return make_config()


@pytest.fixture
async def daemon(config: Any) -> AsyncIterator[Any]:
    async with running_daemon(config) as d:
        yield d


@pytest.fixture
async def client(daemon: Any) -> AsyncIterator[Client]:
    async with Client(daemon.config.socket) as c:
        yield c


def domain_state(lab: Any, host_index: int, domain: str) -> str | None:
    """libvirt's own view, independent of moldd."""
    conn = libvirt.open(lab.hosts[host_index].uri)
    try:
        try:
            dom = conn.lookupByName(domain)
        except libvirt.libvirtError:
            return None
        state = dom.state()[0]
        return {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}.get(state, str(state))
    finally:
        conn.close()
