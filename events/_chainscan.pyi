"""Type stub of the optional C scan (events/_chainscan.c)."""

from collections.abc import Sequence
from typing import Any

def scan(
    uri: str,
    start: int,
    end: int,
    prev_hash: bytes,
    last_ts: int,
    tag: bytes,
    wanted: Sequence[int],
    check_streams: int,
    /,
) -> tuple[Any, ...]: ...
