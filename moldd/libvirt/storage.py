"""qemu-img, run as a subprocess from the loop (never blocking it): overlays, blank disks, resize, info."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moldd.domain.errors import OperationFailed, ValidationError

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: Path | None
    backing_format: str | None


async def _run(*args: str, timeout: float = 60.0) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise OperationFailed(f"{QEMU_IMG} is not installed") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationFailed(f"qemu-img {args[0]} did not finish within {timeout:g} s") from None
    except asyncio.CancelledError:
        # do not leave a qemu-img behind (nor its transport to a closed loop)
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
        code = proc.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        raise OperationFailed(f"qemu-img {args[0]} failed ({how}): {msg or 'no message'}")
    return out.decode(errors="replace")


def _size_arg(size_bytes: int, fld: str = "size_bytes") -> str:
    if size_bytes <= 0:
        raise ValidationError("size must be positive", field=fld)
    return str(size_bytes)


async def async_create_overlay(template: Path, target: Path, size_bytes: int | None = None) -> Path:
    """``qemu-img create -f qcow2 -b TEMPLATE -F qcow2 TARGET [SIZE]``: a copy-on-write root disk."""
    if not Path(template).is_absolute():
        # qemu-img would resolve a relative backing path against the overlay's directory, not ours
        raise ValidationError("the template must be an absolute path", field="template")
    args = ["create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(target)]
    if size_bytes is not None:
        args.append(_size_arg(size_bytes))
    await _run(*args)
    return target


async def async_create_blank(target: Path, size_bytes: int) -> Path:
    await _run("create", "-q", "-f", "qcow2", str(target), _size_arg(size_bytes))
    return target


async def async_resize(path: Path, size_bytes: int, *, shrink: bool = False) -> None:
    """Resize an image that no running guest uses (use the domain's block resize for a live disk)."""
    args = ["resize", "-q"]
    if shrink:
        args.append("--shrink")
    args += [str(path), _size_arg(size_bytes)]
    await _run(*args)


async def async_info(path: Path) -> ImageInfo:
    # -U: readable while QEMU holds the image lock (a running guest's disk).
    raw: dict[str, Any] = json.loads(await _run("info", "-U", "--output=json", str(path)))
    backing = raw.get("full-backing-filename") or raw.get("backing-filename")
    return ImageInfo(
        path=Path(path),
        format=str(raw.get("format", "")),
        virtual_size=int(raw["virtual-size"]),
        actual_size=int(raw["actual-size"]) if "actual-size" in raw else None,
        backing_file=Path(backing) if backing else None,
        backing_format=raw.get("backing-filename-format"),
    )


async def async_lock_holder(path: Path) -> str | None:
    """Whether another process (a live QEMU) holds the image's write lock: qemu-img's refusal, or None when the
    image opens (or does not exist). The probe HA runs before it starts a VM elsewhere: a locked disk means a
    copy still runs, whatever the fence command said."""
    try:
        await _run("info", "--output=json", str(path), timeout=30.0)
    except OperationFailed as exc:
        if "lock" in exc.message:
            return exc.message
        if "No such file" in exc.message:
            return None
        raise
    return None


async def async_delete(path: Path, *, missing_ok: bool = True) -> None:
    # unlink is one syscall on a local file: not worth a thread.
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise OperationFailed(f"{path} does not exist") from None
    except OSError as exc:
        raise OperationFailed(f"cannot delete {path}: {exc.strerror}") from None
