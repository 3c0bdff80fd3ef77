"""Real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, and a loopback TCP
forwarder to the daemon's Unix socket (a browser speaks HTTP over TCP only; operators do the same with
``ssh -L 8080:/run/moldd/moldd.sock host``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.asynccontextmanager
async def forward_tcp_to_unix(socket_path: str) -> AsyncIterator[int]:
    """Listen on 127.0.0.1 (a free port, yielded) and pipe each connection to ``socket_path``."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        both = [asyncio.create_task(pipe(reader, uw)), asyncio.create_task(pipe(ur, writer))]
        tasks.update(both)
        await asyncio.gather(*both, return_exceptions=True)
        tasks.difference_update(both)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class Page:
    """One browser tab over its DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self._reader = asyncio.create_task(self._async_read())

    async def _async_read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(f"DevTools error: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(data["params"]["exceptionDetails"])[:2000])

    async def send(self, method: str, **params: Any) -> Any:
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, 60)

    async def evaluate(self, expression: str) -> Any:
        res = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> Any:
        """Poll ``expression`` in the page until it is truthy (the page changes on its own: no reload)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise TimeoutError(f"page never showed {what or expression!r}; console: {self.console[-10:]}")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: Path) -> Path:
        res = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, int]]:
    """A headless Chromium with a DevTools port; yields (an HTTP session, the DevTools port)."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium executable (scripts/install.sh installs Debian's chromium)")
    profile.mkdir(parents=True, exist_ok=True)
    log_file = (profile / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *[exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.returncode is not None:
                raise RuntimeError(
                    f"chromium exited with {proc.returncode}: {(profile / 'chromium.log').read_text()[-2000:]}"
                )
            if loop.time() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            yield session, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log_file.close()


@contextlib.asynccontextmanager
async def open_page(session: aiohttp.ClientSession, port: int) -> AsyncIterator[Page]:
    async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
        target = await resp.json()
    ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
    page = Page(ws)
    try:
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        yield page
    finally:
        await page.close()
