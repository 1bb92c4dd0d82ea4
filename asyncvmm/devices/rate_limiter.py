"""Token-bucket rate limiters for device I/O, with Firecracker's semantics.

A :class:`TokenBucket` holds up to ``size`` tokens and refills at
``size / refill_time`` tokens per millisecond, continuously; it starts full.
``one_time_burst`` extra tokens are spent first and never come back.  A
request larger than ``size`` would never fit, so it passes when the bucket
is full and leaves it in debt: later requests wait until the debt is repaid,
which keeps the long-run rate.  A bucket with ``size`` 0 or ``refill_time``
0 is *disabled*: :meth:`TokenBucket.from_config` returns ``None``.

A :class:`RateLimiter` pairs a bandwidth bucket (bytes) with an ops bucket
(requests).  When a request does not fit, the limiter *blocks* until that
request would fit, and refuses everything meanwhile; the device puts the
request back and arms a :class:`ThrottleTimer`, which calls the device on
the loop once the limiter unblocks.

PATCH semantics (Firecracker's ``BucketUpdate``): in
:meth:`RateLimiter.update_from_config` an absent bucket leaves that bucket
unchanged, a bucket with ``size`` or ``refill_time`` 0 disables it, anything
else replaces it with a new, full bucket.

Exact integer arithmetic: credit is kept in token-nanoseconds (``tokens *
refill_ns``) and grows by ``size`` per elapsed nanosecond, so no rounding
ever mints or loses a token.  Time comes from an injected clock (a callable
returning nanoseconds); only :class:`ThrottleTimer` touches the loop.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Callable, Protocol

import msgspec

Clock = Callable[[], int]
NS_PER_MS = 1_000_000


class TokenBucketSpec(Protocol):
    """What the API's ``TokenBucket`` carries (``asyncvmm.config.TokenBucketConfig``)."""

    size: int
    refill_time: int
    one_time_burst: int | None


class RateLimiterSpec(Protocol):
    bandwidth: TokenBucketSpec | None
    ops: TokenBucketSpec | None


class TokenType(enum.Enum):
    BYTES = "bytes"
    OPS = "ops"


class BucketState(msgspec.Struct, forbid_unknown_fields=True):
    """A bucket's budget in a snapshot: its credit (token-nanoseconds) and burst left."""

    credit: int
    one_time_burst: int


class RateLimiterState(msgspec.Struct, forbid_unknown_fields=True, tag="rate-limiter-v1"):
    bandwidth: BucketState | None
    ops: BucketState | None


class TokenBucket:
    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Clock = time.monotonic_ns) -> None:
        if size <= 0 or refill_time_ms <= 0 or one_time_burst < 0:
            raise ValueError("a token bucket needs size > 0, refill_time > 0, one_time_burst >= 0")
        self.size = size
        self.refill_time_ms = refill_time_ms
        self.initial_one_time_burst = one_time_burst
        self.one_time_burst = one_time_burst
        self._refill_ns = refill_time_ms * NS_PER_MS
        self._full = size * self._refill_ns
        self._credit = self._full
        self._clock = clock
        self._last = clock()

    @classmethod
    def from_config(cls, spec: TokenBucketSpec, clock: Clock = time.monotonic_ns) -> "TokenBucket | None":
        """A bucket from the API's fields, or ``None`` when they disable it."""
        if spec.size == 0 or spec.refill_time == 0:
            return None
        return cls(spec.size, spec.refill_time, spec.one_time_burst or 0, clock=clock)

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:               # a clock that stands still or steps back adds nothing
            self._credit = min(self._full, self._credit + (now - self._last) * self.size)
            self._last = now

    @property
    def budget(self) -> int:
        """Whole tokens available now, burst aside (negative while in debt)."""
        self._refill()
        return self._credit // self._refill_ns

    def consume(self, tokens: int) -> bool:
        """Take ``tokens`` if they are there (all or nothing)."""
        if tokens <= 0:
            return True
        self._refill()
        from_burst = min(tokens, self.one_time_burst)
        rest = tokens - from_burst
        cost = rest * self._refill_ns
        if self._credit >= cost or (rest > self.size and self._credit == self._full):
            self.one_time_burst -= from_burst
            self._credit -= cost
            return True
        return False

    def time_until(self, tokens: int) -> int:
        """Nanoseconds until :meth:`consume` of ``tokens`` would succeed (0: now)."""
        self._refill()
        rest = tokens - self.one_time_burst
        if rest <= 0:
            return 0
        deficit = min(rest, self.size) * self._refill_ns - self._credit
        return 0 if deficit <= 0 else -(-deficit // self.size)

    def refund(self, tokens: int) -> None:
        """Give back tokens of a request that did not go ahead; overflow refills the burst."""
        if tokens <= 0:
            return
        self._refill()
        credit = self._credit + tokens * self._refill_ns
        if credit > self._full:
            back = (credit - self._full) // self._refill_ns
            self.one_time_burst = min(self.initial_one_time_burst, self.one_time_burst + back)
            credit = self._full
        self._credit = credit

    def save_state(self) -> BucketState:
        self._refill()
        return BucketState(credit=self._credit, one_time_burst=self.one_time_burst)

    def restore_state(self, state: BucketState) -> None:
        """A snapshot's budget for this (same-sized) bucket; refilling goes on from now."""
        self.check_state(state)
        self._credit = state.credit
        self.one_time_burst = state.one_time_burst
        self._last = self._clock()

    def check_state(self, state: BucketState) -> None:
        if not -(1 << 62) < state.credit <= self._full:
            raise ValueError(f"rate limiter state: credit {state.credit} outside the bucket")
        if not 0 <= state.one_time_burst <= self.initial_one_time_burst:
            raise ValueError(f"rate limiter state: one_time_burst {state.one_time_burst} outside "
                             f"0..{self.initial_one_time_burst}")

    def describe(self) -> dict[str, int]:
        """The configuration, in the API's field names."""
        return {"size": self.size, "one_time_burst": self.initial_one_time_burst,
                "refill_time": self.refill_time_ms}


class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


class RateLimiter:
    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None, *,
                 clock: Clock = time.monotonic_ns) -> None:
        self.bandwidth = bandwidth
        self.ops = ops
        self._clock = clock
        self._blocked_until: int | None = None

    @classmethod
    def from_config(cls, spec: RateLimiterSpec | None, clock: Clock = time.monotonic_ns) -> "RateLimiter":
        """A limiter from the API's ``RateLimiter`` (``None`` or ``{}``: unlimited)."""
        limiter = cls(clock=clock)
        if spec is not None:
            limiter.update_from_config(spec)
        return limiter

    def _bucket(self, kind: TokenType) -> TokenBucket | None:
        return self.bandwidth if kind is TokenType.BYTES else self.ops

    @property
    def enabled(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    def is_blocked(self) -> bool:
        if self._blocked_until is not None and self._clock() >= self._blocked_until:
            self._blocked_until = None
        return self._blocked_until is not None

    def wait_ns(self) -> int:
        """Nanoseconds until the limiter unblocks (0 if it is not blocked)."""
        if not self.is_blocked():
            return 0
        return self._blocked_until - self._clock()

    def _block_for(self, bucket: TokenBucket, tokens: int) -> None:
        self._blocked_until = self._clock() + max(1, bucket.time_until(tokens))

    def consume(self, tokens: int, kind: TokenType) -> bool:
        if self.is_blocked():
            return False
        bucket = self._bucket(kind)
        if bucket is None or bucket.consume(tokens):
            return True
        self._block_for(bucket, tokens)
        return False

    def refund(self, tokens: int, kind: TokenType) -> None:
        bucket = self._bucket(kind)
        if bucket is not None:
            bucket.refund(tokens)

    def consume_request(self, nbytes: int) -> bool:
        """One operation of ``nbytes`` bytes: both buckets or neither."""
        if not self.consume(1, TokenType.OPS):
            return False
        if not self.consume(nbytes, TokenType.BYTES):
            self.refund(1, TokenType.OPS)
            return False
        return True

    def save_state(self) -> RateLimiterState:
        return RateLimiterState(bandwidth=self.bandwidth.save_state() if self.bandwidth else None,
                                ops=self.ops.save_state() if self.ops else None)

    def restore_state(self, state: RateLimiterState) -> None:
        """Budgets from a snapshot for the buckets this limiter has (the configuration, which
        the snapshot also holds, made them); a budget for a bucket it lacks is refused."""
        pairs = ((self.bandwidth, state.bandwidth, "bandwidth"), (self.ops, state.ops, "ops"))
        for bucket, saved, name in pairs:
            if saved is not None and bucket is None:
                raise ValueError(f"rate limiter state: a {name} budget for a limiter without one")
            if saved is not None:
                bucket.check_state(saved)
        for bucket, saved, _ in pairs:
            if bucket is not None and saved is not None:
                bucket.restore_state(saved)
        self._blocked_until = None

    def update(self, bandwidth: TokenBucket | None | _Unchanged = UNCHANGED,
               ops: TokenBucket | None | _Unchanged = UNCHANGED) -> None:
        """Replace (a bucket), disable (``None``) or keep (``UNCHANGED``) each bucket."""
        if not isinstance(bandwidth, _Unchanged):
            self.bandwidth = bandwidth
        if not isinstance(ops, _Unchanged):
            self.ops = ops
        # New buckets start full; a block computed from the old ones no longer applies.
        self._blocked_until = None

    def update_from_config(self, spec: RateLimiterSpec) -> None:
        def convert(bucket_spec: TokenBucketSpec | None) -> TokenBucket | None | _Unchanged:
            if bucket_spec is None:
                return UNCHANGED
            return TokenBucket.from_config(bucket_spec, self._clock)
        self.update(convert(spec.bandwidth), convert(spec.ops))

    def describe(self) -> dict[str, dict[str, int]]:
        out = {}
        if self.bandwidth is not None:
            out["bandwidth"] = self.bandwidth.describe()
        if self.ops is not None:
            out["ops"] = self.ops.describe()
        return out


class ThrottleTimer:
    """Calls ``resume`` on the loop once ``limiter`` unblocks; one pending timer at most."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limiter: RateLimiter,
                 resume: Callable[[], None]) -> None:
        self.loop = loop
        self.limiter = limiter
        self.resume = resume
        self._handle: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_later(self.limiter.wait_ns() / 1e9, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self.limiter.is_blocked():      # the loop's clock ran a little ahead of ours
            self.arm()
            return
        self.resume()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
