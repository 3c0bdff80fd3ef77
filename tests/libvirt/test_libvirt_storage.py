"""qemu-img wrappers: overlays on a template, blank disks, resize, info; failures carry qemu-img's words."""

from __future__ import annotations

from pathlib import Path

import pytest

from moldd.domain.errors import OperationFailed, ValidationError
from moldd.libvirt import storage
from moldlab.testing.loopwatch import LoopWatch

MiB = 1 << 20


async def test_overlay_on_template_records_backing_file(tmp_path: Path) -> None:
    template = await storage.async_create_blank(tmp_path / "template.qcow2", 32 * MiB)
    async with LoopWatch() as watch:
        root = await storage.async_create_overlay(template, tmp_path / "root.qcow2", 64 * MiB)
        info = await storage.async_info(root)
    assert watch.max_blocked < 0.2, watch.worst
    assert info.format == "qcow2"
    assert info.virtual_size == 64 * MiB
    assert info.backing_file == template
    assert info.backing_format == "qcow2"


async def test_overlay_without_size_takes_the_template_size(tmp_path: Path) -> None:
    template = await storage.async_create_blank(tmp_path / "t.qcow2", 32 * MiB)
    info = await storage.async_info(await storage.async_create_overlay(template, tmp_path / "r.qcow2"))
    assert info.virtual_size == 32 * MiB


async def test_resize_grows_and_shrinking_needs_the_flag(tmp_path: Path) -> None:
    disk = await storage.async_create_blank(tmp_path / "d.qcow2", 32 * MiB)
    await storage.async_resize(disk, 48 * MiB)
    assert (await storage.async_info(disk)).virtual_size == 48 * MiB
    with pytest.raises(OperationFailed, match="shrink"):
        await storage.async_resize(disk, 16 * MiB)
    await storage.async_resize(disk, 16 * MiB, shrink=True)
    assert (await storage.async_info(disk)).virtual_size == 16 * MiB


async def test_missing_template_fails_with_qemu_img_message(tmp_path: Path) -> None:
    with pytest.raises(OperationFailed) as ei:
        await storage.async_create_overlay(tmp_path / "nope.qcow2", tmp_path / "r.qcow2", 32 * MiB)
    assert "qemu-img create failed (exit status 1)" in ei.value.message
    assert "nope.qcow2" in ei.value.message


async def test_info_of_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match="qemu-img info failed"):
        await storage.async_info(tmp_path / "missing.qcow2")


async def test_bad_size_or_relative_template_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        await storage.async_create_blank(tmp_path / "b.qcow2", 0)
    with pytest.raises(ValidationError):
        await storage.async_create_overlay(Path("t.qcow2"), tmp_path / "r.qcow2")


async def test_delete_tolerates_missing(tmp_path: Path) -> None:
    disk = await storage.async_create_blank(tmp_path / "d.qcow2", MiB)
    await storage.async_delete(disk)
    assert not disk.exists()
    await storage.async_delete(disk)
    with pytest.raises(OperationFailed):
        await storage.async_delete(disk, missing_ok=False)
