from __future__ import annotations

import sqlite3
from pathlib import Path


def drop_triggers_copy(src: Path, dst: Path) -> Path:
    """Copy a log with plain sqlite3 and drop its append-only triggers (what an attacker would do)."""
    s = sqlite3.connect(src)
    d = sqlite3.connect(dst)
    s.backup(d)
    s.close()
    for (name,) in d.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        d.execute(f"DROP TRIGGER {name}")
    d.commit()
    d.close()
    return dst
