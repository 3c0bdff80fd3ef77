"""The optional C accelerators' tests: one gate for both (``events._chainscan``, ``moldd.projection._foldrows``)."""

from __future__ import annotations

import os
from typing import Any

import pytest


def required_accelerator(module: Any, off_env: str, name: str) -> Any:
    """``module`` (the loaded accelerator, or None), skipping the test when ``off_env`` turns it off and failing it
    when it was not built: these tests compare it with the Python it replaces, so a missing build must be loud."""
    if os.environ.get(off_env):
        pytest.skip(f"{off_env} is set: {name} is off")
    if module is None:
        pytest.fail(f"{name} is not built: build it with scripts/install.sh or `python setup.py build_ext --inplace`")
    return module
