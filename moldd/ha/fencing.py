"""The fencing step: make sure a failed host's guests are dead before they are started elsewhere.

Pluggable through a configured argv (IPMI ``ipmitool … power off``, a PDU script, or the lab harness that kills a
host's qemu processes). Exit status 0 means "fenced beyond doubt"; anything else, or a timeout, means we are NOT
sure, and HA must not start that host's VMs elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from moldd.config import Config


@dataclass(frozen=True)
class FenceResult:
    ok: bool
    argv: tuple[str, ...]
    returncode: int | None
    output: str
    seconds: float

    def to_payload(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "argv": list(self.argv),
            "returncode": self.returncode,
            "output": self.output[-2000:],
            "seconds": round(self.seconds, 3),
        }


def fence_argv(config: Config, host: str) -> tuple[str, ...] | None:
    h = config.host(host)
    if h is None:
        return None
    template = h.fence_command or config.ha.fence_command
    if template is None:
        return None
    return tuple(part.format(host=h.name, uri=h.uri, cluster=h.cluster) for part in template)


async def async_fence(config: Config, host: str) -> FenceResult:
    argv = fence_argv(config, host)
    loop = asyncio.get_running_loop()
    started = loop.time()
    if argv is None:
        return FenceResult(False, (), None, "no fence_command is configured for this host", 0.0)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return FenceResult(
            False, argv, None, f"could not run the fence command: {exc}", loop.time() - started
        )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), config.ha.fence_timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return FenceResult(
            False, argv, None, f"timed out after {config.ha.fence_timeout_s:g} s", loop.time() - started
        )
    text = out.decode(errors="replace")
    return FenceResult(proc.returncode == 0, argv, proc.returncode, text, loop.time() - started)
