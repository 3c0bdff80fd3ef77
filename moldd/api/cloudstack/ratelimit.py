"""Token buckets per key (API key, or the peer for unauthenticated traffic)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` requests per second sustained, ``burst`` at once, per key; at most ``max_keys`` buckets
    (the least recently used go first, so a flood of made-up keys cannot grow memory without bound)."""

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 10000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, float(burst), max_keys, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # re-inserted: dicts keep insertion order, oldest first
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return allowed

    def exhausted(self, key: str) -> bool:
        """True while ``key`` has no token left (the bucket is not touched)."""
        hit = self._buckets.get(key)
        if hit is None:
            return False
        tokens, at = hit
        return min(self.burst, tokens + (self.clock() - at) * self.rate) < 1.0
