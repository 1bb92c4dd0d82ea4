"""virtio-rng through the transport."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio.rng import Rng
from asyncvmm.devices.virtio.rng.handler import MAX_BYTES_PER_REQUEST
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET, VIRTIO_ID_RNG
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.conftest import make_rig


class Counter:
    """A deterministic 'random' source, to check what reached the guest."""

    def __init__(self):
        self.calls = []

    def __call__(self, n):
        self.calls.append(n)
        return bytes((len(self.calls) + i) & 0xFF for i in range(n))


@pytest.fixture
async def rng():
    src = Counter()
    dev = Rng(random_bytes=src)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    yield rig, dev, vq, src
    dev.deactivate()
    rig.close()


def test_identity():
    assert Rng().device_type == VIRTIO_ID_RNG == 4
    assert Rng().num_queues == 1


async def test_fills_writable_buffers(rng):
    rig, dev, vq, src = rng
    head = vq.add_chain([Buf(0x200000, 16, True), Buf(0x300000, 48, True)])
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 64)]
    assert src.calls == [64]
    assert rig.mem.read(0x200000, 16) + rig.mem.read(0x300000, 48) == bytes(
        (1 + i) & 0xFF for i in range(64))
    assert dev.metrics.entropy_bytes == 64 and dev.metrics.entropy_event_count == 1


async def test_huge_buffers_get_a_bounded_amount(rng):
    rig, dev, vq, src = rng
    head = vq.add_chain([Buf(0x200000, 4 << 20, True)])
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, MAX_BYTES_PER_REQUEST)]


async def test_readable_buffers_are_refused(rng):
    rig, dev, vq, src = rng
    head = vq.add_chain([Buf(0x200000, 16), Buf(0x300000, 16, True)])
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 0)]
    assert dev.metrics.entropy_event_fails == 1 and src.calls == []


async def test_host_rng_failure_answers_zero_bytes(rng):
    rig, dev, vq, src = rng

    def broken(n):
        raise OSError("no entropy")
    dev.random_bytes = broken
    head = vq.add_chain([Buf(0x200000, 16, True)])
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 0)]
    assert dev.metrics.host_rng_fails == 1


async def test_rate_limited_entropy():
    now = [0]
    clock = lambda: now[0]                        # noqa: E731
    limiter = RateLimiter(bandwidth=TokenBucket(100, 10, clock=clock), clock=clock)
    dev = Rng(limiter)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    for i in range(3):
        vq.offer(vq.add_chain([Buf(0x200000 + i * 0x1000, 40, True)]))
    rig.driver.kick(vq)
    assert len(await rig.driver.wait_used(vq, 2)) == 2       # 80 of 100 bytes
    await settle()
    assert vq.take_used() == []
    assert dev.metrics.entropy_rate_limiter_throttled >= 1
    now[0] += 10_000_000
    assert len(await rig.driver.wait_used(vq, 1)) == 1
    assert dev.metrics.rate_limiter_event_count >= 1
    dev.deactivate()
    rig.close()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                st.integers(0, 7), st.integers(0, 300)), max_size=10),
       heads=st.lists(st.integers(0, 300), min_size=1, max_size=6))
async def test_hostile_chains_are_answered_or_need_reset(table, heads):
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
    dev = Rng()
    rig = make_rig(dev)
    try:
        [vq] = await rig.driver.init()
        for index, addr, length, flags, nxt in table:
            vq.write_desc(index, addr % (rig.mem.end + 0x1000), length % 0x20000, flags, nxt)
        for h in heads:
            vq.offer(h)
        rig.driver.kick(vq)
        await settle(10)
        assert errors == []
        if not rig.driver.status & DEVICE_NEEDS_RESET:
            assert [h for h, _ in vq.take_used()] == heads
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        dev.deactivate()
        rig.close()
