"""The daemon fixtures of tests/daemon (a real moldd on the session's lab hosts), plus a scraper."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.daemon.conftest import clean_lab, client, config, daemon, make_config  # noqa: F401


async def get(socket: Any, path: str) -> tuple[int, str, bytes]:
    """``GET path`` on the daemon's Unix socket: (status, content type, body)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session,
        session.get(f"http://moldd{path}") as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()
