"""``[daemon] event_loop``: the daemon runs on uvloop by default, on asyncio's own loop when asked; a bad value is
refused at load with the key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moldd.config import ConfigError, load_config
from moldd.daemon import run_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_loop_uses_the_configured_loop() -> None:
    assert run_loop(_loop_module(), "uvloop").startswith("uvloop")
    assert run_loop(_loop_module(), "asyncio").startswith("asyncio")


def test_event_loop_key_defaults_to_uvloop_and_refuses_others(tmp_path: Path) -> None:
    path = tmp_path / "moldd.toml"
    hosts = '[[hosts]]\nname = "h1"\nuri = "test:///default"\ncluster = "c1"\nmax_vms = 2\n'
    path.write_text(f'[daemon]\nsocket = "{tmp_path}/s.sock"\n{hosts}')
    assert load_config(path).event_loop == "uvloop"
    path.write_text(f'[daemon]\nsocket = "{tmp_path}/s.sock"\nevent_loop = "asyncio"\n{hosts}')
    assert load_config(path).event_loop == "asyncio"
    path.write_text(f'[daemon]\nsocket = "{tmp_path}/s.sock"\nevent_loop = "trio"\n{hosts}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "event_loop" in str(info.value.key)
