"""Time limits of tests that wait for slow real things (a TCG guest booting, libvirt reacting), scaled to the
machine's load: a limit is where a test gives up on something that hangs, not a speed claim, and it must not
fail a correct run on a busy machine."""

from __future__ import annotations

import os

MAX_FACTOR = 8.0


def load_factor() -> float:
    """How much slower than on a quiet machine things may run now: the 1-minute load per CPU (at least 1, at most
    MAX_FACTOR), times ``MOLDD_TEST_TIMEOUT_SCALE`` if set (e.g. 3 on a slow CI runner)."""
    try:
        per_cpu = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        per_cpu = 1.0
    try:
        extra = float(os.environ.get("MOLDD_TEST_TIMEOUT_SCALE", "1"))
    except ValueError:
        extra = 1.0
    return max(1.0, min(MAX_FACTOR, per_cpu)) * max(1.0, extra)


def scaled(seconds: float) -> float:
    """``seconds`` on a quiet machine, more on a busy one (see load_factor)."""
    return seconds * load_factor()
