"""Token buckets and rate limiters against a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.devices.rate_limiter import (
    UNCHANGED,
    RateLimiter,
    ThrottleTimer,
    TokenBucket,
    TokenType,
)

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


@dataclass
class BucketCfg:
    size: int
    refill_time: int
    one_time_burst: int | None = None


@dataclass
class LimiterCfg:
    bandwidth: BucketCfg | None = None
    ops: BucketCfg | None = None


def test_bucket_starts_full_and_refills_linearly():
    c = Clock()
    b = TokenBucket(1000, 100, clock=c)
    assert b.consume(1000) and not b.consume(1)
    c.now += 10 * MS                          # a tenth of the refill time
    assert b.budget == 100
    assert b.consume(100) and not b.consume(1)


def test_refill_never_exceeds_size():
    c = Clock()
    b = TokenBucket(10, 1, clock=c)
    c.now += 10**12
    assert b.budget == 10


def test_one_time_burst_goes_first_and_never_comes_back():
    c = Clock()
    b = TokenBucket(10, 1000, one_time_burst=5, clock=c)
    assert b.consume(15) and b.one_time_burst == 0 and b.budget == 0
    c.now += 10**12
    assert b.budget == 10 and b.one_time_burst == 0


def test_failed_consume_takes_nothing():
    c = Clock()
    b = TokenBucket(10, 1000, clock=c)
    assert b.consume(6)
    assert not b.consume(5)
    assert b.budget == 4


def test_request_beyond_burst_plus_bucket_passes_once_from_full():
    c = Clock()
    b = TokenBucket(10, 1000, one_time_burst=3, clock=c)
    assert b.consume(14)                     # 3 from the burst, 11 from a full bucket of 10
    assert b.one_time_burst == 0 and b.budget == -1


def test_time_until_is_exact():
    c = Clock()
    b = TokenBucket(1000, 1000, clock=c)     # one token per ms
    b.consume(1000)
    assert b.time_until(10) == 10 * MS
    c.now += 10 * MS - 1
    assert not b.consume(10)
    c.now += 1
    assert b.consume(10)


def test_oversized_request_passes_from_a_full_bucket_and_leaves_debt():
    c = Clock()
    b = TokenBucket(100, 100, clock=c)       # one token per ms
    assert b.consume(250)                    # 2.5 buckets
    assert b.budget == -150
    assert b.time_until(100) == 250 * MS     # repay 150, then refill 100
    c.now += 249 * MS
    assert not b.consume(100)
    c.now += 1 * MS
    assert b.consume(100)


def test_oversized_request_waits_for_a_full_bucket():
    c = Clock()
    b = TokenBucket(100, 100, clock=c)
    b.consume(1)
    assert not b.consume(500)
    assert b.time_until(500) == 1 * MS


def test_refund_returns_tokens_up_to_size_then_burst():
    c = Clock()
    b = TokenBucket(10, 1000, one_time_burst=4, clock=c)
    assert b.consume(6)                      # 4 from burst, 2 from the bucket
    b.refund(6)
    assert b.budget == 10 and b.one_time_burst == 4


@pytest.mark.parametrize("size,refill", [(0, 100), (100, 0), (0, 0)])
def test_zero_size_or_refill_disables(size, refill):
    assert TokenBucket.from_config(BucketCfg(size, refill)) is None


def test_backwards_clock_adds_nothing():
    c = Clock()
    c.now = 10**9
    b = TokenBucket(10, 10, clock=c)
    b.consume(10)
    c.now -= 5 * 10**8
    assert b.budget == 0


operations = st.lists(st.tuples(st.integers(0, 50 * MS), st.integers(1, 100)), max_size=200)


@given(size=st.integers(1, 100), refill_ms=st.integers(1, 100), burst=st.integers(0, 200), ops=operations)
def test_never_more_than_size_burst_and_refill_in_any_window(size, refill_ms, burst, ops):
    c = Clock()
    b = TokenBucket(size, refill_ms, one_time_burst=burst, clock=c)
    accepted: list[tuple[int, int]] = []      # (time, tokens)
    for dt, n in ops:
        c.now += dt
        if n <= size and b.consume(n):
            accepted.append((c.now, n))
    refill_ns = refill_ms * MS
    for i, (t0, _) in enumerate(accepted):
        total = 0
        for t1, n in accepted[i:]:
            total += n
            # Tokens taken in [t0, t1]: a full bucket, the burst, and what refilled meanwhile.
            assert total * refill_ns <= (size + burst) * refill_ns + (t1 - t0) * size


@given(size=st.integers(1, 1000), refill_ms=st.integers(1, 1000), n=st.integers(1, 1000),
       used=st.integers(0, 1000), elapsed=st.integers(0, 10**9))
def test_time_until_is_enough_and_not_more(size, refill_ms, n, used, elapsed):
    n = min(n, size)
    c = Clock()
    b = TokenBucket(size, refill_ms, clock=c)
    b.consume(min(used, size))
    c.now += elapsed
    wait = b.time_until(n)
    if wait:
        c.now += wait - 1
        assert not b.consume(n)
        c.now += 1
    assert b.consume(n)


def test_limiter_blocks_everything_until_the_failed_request_fits():
    c = Clock()
    lim = RateLimiter(TokenBucket(1000, 1000, clock=c), TokenBucket(10, 1000, clock=c), clock=c)
    assert lim.consume_request(1000)
    assert not lim.consume_request(10)
    assert lim.is_blocked() and lim.wait_ns() == 10 * MS
    assert not lim.consume(1, TokenType.OPS)  # blocked: even ops that would fit are refused
    assert lim.ops.budget == 9                # the refused request's op was refunded
    c.now += 10 * MS
    assert not lim.is_blocked()
    assert lim.consume_request(10)


def test_unlimited_limiter():
    lim = RateLimiter()
    assert not lim.enabled
    assert all(lim.consume_request(10**12) for _ in range(100))


def test_update_semantics_match_patch():
    c = Clock()
    lim = RateLimiter.from_config(LimiterCfg(bandwidth=BucketCfg(100, 10), ops=BucketCfg(5, 10)), c)
    bw = lim.bandwidth
    lim.update_from_config(LimiterCfg(ops=BucketCfg(7, 20, 3)))     # bandwidth absent: unchanged
    assert lim.bandwidth is bw
    assert lim.ops.describe() == {"size": 7, "one_time_burst": 3, "refill_time": 20}
    lim.update_from_config(LimiterCfg(bandwidth=BucketCfg(0, 10)))  # size 0: disabled
    assert lim.bandwidth is None and lim.ops is not None
    lim.update(UNCHANGED, None)
    assert not lim.enabled
    assert RateLimiter.from_config(LimiterCfg()).describe() == {}


def test_update_unblocks():
    c = Clock()
    lim = RateLimiter(ops=TokenBucket(1, 1000, clock=c), clock=c)
    lim.consume(1, TokenType.OPS)
    assert not lim.consume(1, TokenType.OPS)
    lim.update(ops=TokenBucket(1, 1000, clock=c))
    assert lim.consume(1, TokenType.OPS)


async def test_throttle_timer_resumes_once_unblocked():
    c = Clock()
    lim = RateLimiter(ops=TokenBucket(1, 1, clock=c), clock=c)     # 1 op per ms
    lim.consume(1, TokenType.OPS)
    assert not lim.consume(1, TokenType.OPS)
    resumed = asyncio.Event()
    timer = ThrottleTimer(asyncio.get_running_loop(), lim, resumed.set)
    timer.arm()
    timer.arm()                               # one pending timer at most
    assert timer.armed
    await asyncio.sleep(0.005)
    assert not resumed.is_set()               # our clock has not moved: it re-armed
    c.now += MS
    await asyncio.wait_for(resumed.wait(), 5)
    assert not timer.armed


async def test_throttle_timer_cancel():
    c = Clock()
    lim = RateLimiter(ops=TokenBucket(1, 1, clock=c), clock=c)
    lim.consume(1, TokenType.OPS)
    lim.consume(1, TokenType.OPS)
    called = []
    timer = ThrottleTimer(asyncio.get_running_loop(), lim, lambda: called.append(1))
    timer.arm()
    timer.cancel()
    c.now += MS
    await asyncio.sleep(0.005)
    assert called == [] and not timer.armed
