"""What the daemon imports without a checkpoint key: not ``cryptography`` (~8 MiB of resident memory, its Rust
extension), which ``events`` and ``moldd`` import only where a key is used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_daemon_and_its_api_import_no_cryptography_until_a_key_is_used() -> None:
    code = (
        "import sys, moldd.daemon, moldd.api.serve, moldd.integrity, events\n"
        "from moldd.daemon import _load_optional_verbs\n"
        "_load_optional_verbs()\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
        "from events.checkpoint import load_public_key\n"
        "print('cryptography.hazmat.primitives.serialization' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    ).stdout.split("\n")  # fmt: skip
    assert out[0] == "[]", out[0]
    assert out[1] == "False"  # (importing the function imports nothing more either)
