"""virtio-net rate limiters on both directions, with a fake clock, and PATCH updates."""

from __future__ import annotations

from asyncvmm.config import RateLimiterConfig, TokenBucketConfig
from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio.net.header import VNET_HDR_SIZE
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.net.conftest import frame, make_net_rig, seq_of

MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def seqs(sent: list[bytes]) -> list[int]:
    return [seq_of(s[VNET_HDR_SIZE:]) for s in sent]


async def test_tx_bandwidth_limit_holds_frames_until_tokens_refill():
    clock = Clock()
    # 3000 bytes per 20 ms: two 1012-byte chains (header included) fit, the third waits.
    # (Short refill times keep the real throttle timers short; the fake clock decides.)
    tx = RateLimiter(bandwidth=TokenBucket(3000, 20, clock=clock), clock=clock)
    n = await make_net_rig(tx_rate_limiter=tx)
    for i in range(4):
        n.transmit(frame(1000, seq=i), kick=False)
    n.driver.kick(n.txq)
    assert seqs(await n.wait_sent(2)) == [0, 1]
    await settle(10)
    assert n.tap.sent() == []
    m = n.dev.metrics
    assert m.tx_rate_limiter_throttled >= 1 and n.handler.tx_timer.armed
    assert m.tx_remaining_reqs_count >= 2
    clock.now += 20 * MS
    assert seqs(await n.wait_sent(2)) == [2, 3]
    assert m.tx_rate_limiter_event_count >= 1
    assert len(await n.driver.wait_used(n.txq, 4)) == 4
    n.close()


async def test_rx_ops_limit_holds_a_frame_and_stops_reading_the_tap():
    clock = Clock()
    rx = RateLimiter(ops=TokenBucket(2, 20, clock=clock), clock=clock)
    n = await make_net_rig(rx_rate_limiter=rx, post=8)
    for i in range(5):
        n.tap.inject(frame(100, seq=i))
    got = await n.wait_received(2)
    await settle(10)
    assert n.received() == []
    assert not n.handler.reading and n.handler.held is not None
    assert n.dev.metrics.rx_rate_limiter_throttled >= 1
    clock.now += 20 * MS
    got += await n.wait_received(2)
    clock.now += 20 * MS
    got += await n.wait_received(1)
    assert [seq_of(d) for _, d in got] == list(range(5))
    assert n.dev.metrics.rx_event_rate_limiter_count >= 1
    n.close()


async def test_patch_replaces_a_limiter_and_releases_what_waited():
    clock = Clock()
    tx = RateLimiter(ops=TokenBucket(1, 60_000, clock=clock), clock=clock)
    rx = RateLimiter(ops=TokenBucket(1, 60_000, clock=clock), clock=clock)
    n = await make_net_rig(tx_rate_limiter=tx, rx_rate_limiter=rx, post=8)
    for i in range(3):
        n.transmit(frame(64, seq=i), kick=False)
        n.tap.inject(frame(64, seq=10 + i))
    n.driver.kick(n.txq)
    assert len(await n.wait_sent(1)) == 1
    assert len(await n.wait_received(1)) == 1
    await settle(10)
    # A minute of refill is far away; a PATCH with a large bucket lets both go now.
    big = RateLimiterConfig(ops=TokenBucketConfig(size=1000, refill_time=1000))
    n.dev.update_rate_limiters(rx=big, tx=None)
    assert [seq_of(d) for _, d in await n.wait_received(2)] == [11, 12]
    await settle(10)
    assert n.tap.sent() == []                        # tx was absent from the PATCH: unchanged
    n.dev.update_rate_limiters(rx=None, tx=RateLimiterConfig(ops=TokenBucketConfig(size=0, refill_time=0)))
    assert seqs(await n.wait_sent(2)) == [1, 2]      # a zero-size bucket disables the limit
    assert n.dev.tx_rate_limiter.ops is None and n.dev.rx_rate_limiter.ops.size == 1000
    n.close()


async def test_mmds_frames_are_charged_to_the_tx_limiter_too():
    from tests.unit.devices.virtio.net.test_net_mmds import make_stack
    from tests.unit.mmds.guest import arp_request

    clock = Clock()
    tx = RateLimiter(ops=TokenBucket(1, 20, clock=clock), clock=clock)
    n = await make_net_rig(tx_rate_limiter=tx, mmds=make_stack(), post=4)
    n.transmit(arp_request(), kick=False)
    n.transmit(arp_request(sender_ip=bytes([172, 16, 0, 3])), kick=False)
    n.driver.kick(n.txq)
    assert len(await n.wait_received(1)) == 1
    await settle(10)
    assert n.received() == []
    clock.now += 20 * MS
    assert len(await n.wait_received(1)) == 1
    n.close()
