from __future__ import annotations

from moldd.api.cloudstack.ratelimit import RateLimiter


def test_bucket_refuses_beyond_burst_and_refills() -> None:
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rl.allow("k") for _ in range(4)] == [True, True, True, False]
    assert rl.allow("other")  # per key
    assert rl.exhausted("k")
    now[0] += 0.5  # one token back
    assert not rl.exhausted("k")
    assert rl.allow("k") and not rl.allow("k")


def test_bucket_count_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_keys=100, clock=lambda: 0.0)
    for i in range(1000):
        rl.allow(f"k{i}")
    assert len(rl._buckets) == 100
