"""The fencing step: make sure a failed host's guests are dead before they are started elsewhere.

Pluggable through a configured argv (IPMI ``ipmitool … power off``, a PDU script, or the lab harness that kills a
host's qemu processes). Exit status 0 means "fenced beyond doubt"; anything else, or a timeout, means we are NOT
sure, and HA must not start that host's VMs elsewhere.

Secrets in the command line stay out of the log: an argument written ``"secret:VALUE"`` in the configuration is
passed as VALUE, and the argument after a password/key flag (``-P``, ``-p``, ``-k``, ``--password``, ...) is a
secret too. The recorded argv shows ``***`` for each, and every occurrence of a secret in the command's output
is replaced by ``***`` before it is recorded."""

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


SECRET_PREFIX = "secret:"
SECRET_FLAGS = frozenset({"-P", "-p", "-k", "--password", "--passwd", "--pass", "--key", "--secret"})
MASK = "***"


def fence_argv(config: Config, host: str) -> tuple[str, ...] | None:
    """The argv to run (secrets in clear: never record it; see fence_command)."""
    cmd = fence_command(config, host)
    return None if cmd is None else cmd[0]


def fence_command(config: Config, host: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    """(argv to run, argv to record with secrets masked, the secret values) for `host`, or None."""
    h = config.host(host)
    if h is None:
        return None
    template = h.fence_command or config.ha.fence_command
    if template is None:
        return None
    argv: list[str] = []
    shown: list[str] = []
    found: list[str] = []
    after_flag = False
    for part in template:
        secret = part.startswith(SECRET_PREFIX)
        value = part[len(SECRET_PREFIX) :] if secret else part.format(host=h.name, uri=h.uri, cluster=h.cluster)
        flag, eq, inline = value.partition("=")
        if secret or after_flag:
            argv.append(value)
            shown.append(MASK)
            found.append(value)
        elif eq and flag in SECRET_FLAGS:
            argv.append(value)
            shown.append(f"{flag}={MASK}")
            found.append(inline)
        else:
            argv.append(value)
            shown.append(value)
        after_flag = not secret and not after_flag and value in SECRET_FLAGS
    return tuple(argv), tuple(shown), tuple(s for s in found if s)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


async def async_fence(config: Config, host: str) -> FenceResult:
    cmd = fence_command(config, host)
    loop = asyncio.get_running_loop()
    started = loop.time()
    if cmd is None:
        return FenceResult(False, (), None, "no fence_command is configured for this host", 0.0)
    real, argv, secrets = cmd
    try:
        proc = await asyncio.create_subprocess_exec(
            *real,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return FenceResult(
            False, argv, None, redact(f"could not run the fence command: {exc}", secrets), loop.time() - started
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
    text = redact(out.decode(errors="replace"), secrets)
    return FenceResult(proc.returncode == 0, argv, proc.returncode, text, loop.time() - started)
