"""Once ready, the daemon bounds how long another thread may hold the GIL away from its loop (a background
snapshot's encoding, libvirt's event thread): Python's default switch interval (5 ms) is a whole API p99 budget."""

from __future__ import annotations

import sys
from typing import Any

from moldd.daemon import GIL_SWITCH_INTERVAL_S


async def test_the_ready_daemon_sets_the_gil_switch_interval(daemon: Any) -> None:
    assert GIL_SWITCH_INTERVAL_S <= 0.001
    assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL_S
