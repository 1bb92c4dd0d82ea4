"""virtio-pmem through the virtio-mmio transport, against the fake driver."""

from __future__ import annotations

import asyncio
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio.pmem import Pmem, PmemState
from asyncvmm.devices.virtio.pmem.request import (
    VIRTIO_PMEM_REQ_TYPE_FLUSH,
    VIRTIO_PMEM_RESP_TYPE_EIO,
    VIRTIO_PMEM_RESP_TYPE_OK,
)
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_ID_PMEM, bit
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.conftest import make_rig

START, SIZE, FILE_LEN = 512 << 30, 4 << 20, 3 << 20
REQ, RESP = 0x200000, 0x201000


class Backing:
    """A flush that counts its calls; ``hold`` makes the next ones wait until released."""

    def __init__(self, ok: bool = True) -> None:
        self.calls = 0
        self.ok = ok
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def __call__(self) -> bool:
        self.calls += 1
        self.started.set()
        self.hold.wait(10)
        return self.ok


def make_pmem(flush, **kw) -> Pmem:
    return Pmem("p0", start=START, size=SIZE, file_len=FILE_LEN, flush=flush, **kw)


@pytest.fixture
async def pmem():
    backing = Backing()
    dev = make_pmem(backing)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    yield rig, dev, vq, backing
    dev.deactivate()
    rig.close()


def flush_request(rig, vq, n: int = 0, request_type: int = VIRTIO_PMEM_REQ_TYPE_FLUSH) -> int:
    req, resp = REQ + 0x10 * n, RESP + 0x10 * n
    rig.mem.write_u32(req, request_type)
    rig.mem.write_u32(resp, 0xDEAD)
    return vq.add_chain([Buf(req, 4), Buf(resp, 4, True)])


def test_identity():
    dev = make_pmem(lambda: True)
    assert dev.device_type == VIRTIO_ID_PMEM == 27
    assert dev.num_queues == 1 and dev.queue_max_sizes == (256,)
    assert dev.avail_features == bit(VIRTIO_F_VERSION_1)


def test_config_space_is_start_and_size():
    dev = make_pmem(lambda: True)
    assert dev.read_config(0, 16) == struct.pack("<QQ", START, SIZE)
    assert dev.read_config(8, 8) == struct.pack("<Q", SIZE)
    assert dev.read_config(4, 4) == struct.pack("<Q", START)[4:]
    assert dev.metrics.cfg_fails == 0
    assert dev.read_config(12, 8) == struct.pack("<Q", SIZE)[4:] + bytes(4)
    assert dev.metrics.cfg_fails == 1


def test_config_space_is_read_only():
    dev = make_pmem(lambda: True)
    dev.write_config(0, bytes(8))
    assert dev.read_config(0, 16) == struct.pack("<QQ", START, SIZE)


def test_state_is_the_placement():
    assert make_pmem(lambda: True).save_state() == PmemState(start=START, size=SIZE)


async def test_flush_writes_back_and_answers_ok(pmem):
    rig, dev, vq, backing = pmem
    head = flush_request(rig, vq)
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 4)]
    assert rig.mem.read_u32(RESP) == VIRTIO_PMEM_RESP_TYPE_OK
    assert backing.calls == 1
    assert dev.metrics.queue_event_count == 1 and dev.metrics.event_fails == 0
    assert rig.irq.count >= 1


async def test_failed_write_back_answers_eio(pmem):
    rig, dev, vq, backing = pmem
    backing.ok = False
    head = flush_request(rig, vq)
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 4)]
    assert rig.mem.read_u32(RESP) == VIRTIO_PMEM_RESP_TYPE_EIO


async def test_flush_that_raises_answers_eio():
    def broken():
        raise OSError(5, "EIO")
    dev = make_pmem(broken)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    head = flush_request(rig, vq)
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 4)]
    assert rig.mem.read_u32(RESP) == VIRTIO_PMEM_RESP_TYPE_EIO
    dev.deactivate()
    rig.close()


async def test_flushes_of_one_kick_share_one_write_back(pmem):
    rig, dev, vq, backing = pmem
    heads = [flush_request(rig, vq, n) for n in range(5)]
    for h in heads:
        vq.offer(h)
    rig.driver.kick(vq)
    assert sorted(await rig.driver.wait_used(vq, 5)) == sorted((h, 4) for h in heads)
    assert backing.calls == 1
    assert all(rig.mem.read_u32(RESP + 0x10 * n) == 0 for n in range(5))


async def test_flush_during_a_write_back_waits_for_the_next_one(pmem):
    rig, dev, vq, backing = pmem
    backing.hold.clear()
    first = flush_request(rig, vq, 0)
    vq.offer(first)
    rig.driver.kick(vq)
    assert await asyncio.to_thread(backing.started.wait, 5)
    second = flush_request(rig, vq, 1)
    vq.offer(second)
    rig.driver.kick(vq)
    await settle(10)
    assert vq.take_used() == [] and backing.calls == 1
    backing.hold.set()
    assert sorted(await rig.driver.wait_used(vq, 2)) == sorted([(first, 4), (second, 4)])
    assert backing.calls == 2       # the second request was not answered by the first msync


HOSTILE = {
    "write-only header": lambda rig: [Buf(REQ, 4, True), Buf(RESP, 4, True)],
    "short header": lambda rig: [Buf(REQ, 2), Buf(RESP, 4, True)],
    "long header": lambda rig: [Buf(REQ, 8), Buf(RESP, 4, True)],
    "no response": lambda rig: [Buf(REQ, 4)],
    "read-only response": lambda rig: [Buf(REQ, 4), Buf(RESP, 4)],
    "short response": lambda rig: [Buf(REQ, 4), Buf(RESP, 1, True)],
    "long response": lambda rig: [Buf(REQ, 4), Buf(RESP, 8, True)],
    "header outside RAM": lambda rig: [Buf(rig.mem.end + 0x1000, 4), Buf(RESP, 4, True)],
    "response outside RAM": lambda rig: [Buf(REQ, 4), Buf(rig.mem.end - 2, 4, True)],
}


@pytest.mark.parametrize("shape", sorted(HOSTILE))
async def test_unusable_requests_get_no_flush(pmem, shape):
    rig, dev, vq, backing = pmem
    rig.mem.write_u32(REQ, VIRTIO_PMEM_REQ_TYPE_FLUSH)
    rig.mem.write_u32(RESP, 0xDEAD)
    head = vq.add_chain(HOSTILE[shape](rig))
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 0)]
    assert backing.calls == 0
    assert rig.mem.read_u32(RESP) == 0xDEAD
    assert dev.metrics.event_fails == 1
    assert not rig.driver.status & DEVICE_NEEDS_RESET


@pytest.mark.parametrize("request_type", [1, 2, 0xFFFF_FFFF])
async def test_unknown_request_types_are_refused(pmem, request_type):
    rig, dev, vq, backing = pmem
    head = flush_request(rig, vq, request_type=request_type)
    vq.offer(head)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(head, 0)]
    assert backing.calls == 0 and dev.metrics.event_fails == 1


async def test_a_bad_request_does_not_stop_the_good_ones(pmem):
    rig, dev, vq, backing = pmem
    bad = vq.add_chain([Buf(REQ + 0x100, 4, True)])
    good = flush_request(rig, vq)
    vq.offer(bad)
    vq.offer(good)
    rig.driver.kick(vq)
    assert sorted(await rig.driver.wait_used(vq, 2)) == sorted([(bad, 0), (good, 4)])
    assert backing.calls == 1


async def test_rate_limited_flushes():
    now = [0]
    clock = lambda: now[0]                        # noqa: E731
    limiter = RateLimiter(ops=TokenBucket(1, 100, clock=clock), clock=clock)
    backing = Backing()
    dev = make_pmem(backing, rate_limiter=limiter)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    first = flush_request(rig, vq, 0)
    vq.offer(first)
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(first, 4)]
    second = flush_request(rig, vq, 1)
    vq.offer(second)
    rig.driver.kick(vq)
    await settle(10)
    assert vq.take_used() == [] and backing.calls == 1
    assert dev.metrics.rate_limiter_throttled_events == 1
    now[0] += 100_000_000
    assert await rig.driver.wait_used(vq, 1) == [(second, 4)]
    assert backing.calls == 2 and dev.metrics.rate_limiter_event_count >= 1
    dev.deactivate()
    rig.close()


async def test_bandwidth_is_charged_the_file_length():
    now = [0]
    clock = lambda: now[0]                        # noqa: E731
    # Room for two write-backs of FILE_LEN bytes, not three.
    limiter = RateLimiter(bandwidth=TokenBucket(2 * FILE_LEN, 1000, clock=clock), clock=clock)
    backing = Backing()
    dev = make_pmem(backing, rate_limiter=limiter)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    for n in range(3):
        head = flush_request(rig, vq, n)
        vq.offer(head)
        rig.driver.kick(vq)
        if n < 2:
            assert await rig.driver.wait_used(vq, 1) == [(head, 4)]
    await settle(10)
    assert vq.take_used() == [] and backing.calls == 2
    dev.update_rate_limiter(type("Spec", (), {"bandwidth": None, "ops": None})())
    await settle(10)
    assert vq.take_used() == []          # an update naming no bucket changes nothing
    now[0] += 1_000_000_000
    assert len(await rig.driver.wait_used(vq, 1)) == 1
    dev.deactivate()
    rig.close()


async def test_patched_rate_limiter_resumes_a_throttled_queue():
    now = [0]
    clock = lambda: now[0]                        # noqa: E731
    limiter = RateLimiter(ops=TokenBucket(1, 1_000_000, clock=clock), clock=clock)
    backing = Backing()
    dev = make_pmem(backing, rate_limiter=limiter)
    rig = make_rig(dev)
    [vq] = await rig.driver.init()
    heads = [flush_request(rig, vq, n) for n in range(2)]
    vq.offer(heads[0])
    rig.driver.kick(vq)
    await rig.driver.wait_used(vq, 1)
    vq.offer(heads[1])
    rig.driver.kick(vq)
    await settle(10)
    assert vq.take_used() == []
    from asyncvmm.config import RateLimiterConfig, TokenBucketConfig
    dev.update_rate_limiter(RateLimiterConfig(ops=TokenBucketConfig(size=10, refill_time=1000)))
    assert await rig.driver.wait_used(vq, 1) == [(heads[1], 4)]
    dev.deactivate()
    rig.close()


async def test_reset_during_a_write_back_touches_nothing(pmem):
    rig, dev, vq, backing = pmem
    backing.hold.clear()
    head = flush_request(rig, vq)
    vq.offer(head)
    rig.driver.kick(vq)
    assert await asyncio.to_thread(backing.started.wait, 5)
    await rig.driver.reset()
    backing.hold.set()
    await asyncio.sleep(0.05)
    await settle(10)
    assert rig.mem.read_u32(RESP) == 0xDEAD
    assert vq.used_idx == 0


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                st.integers(0, 7), st.integers(0, 300)), max_size=10),
       heads=st.lists(st.integers(0, 300), min_size=1, max_size=6),
       words=st.lists(st.integers(0, 3), min_size=1, max_size=4))
async def test_hostile_chains_are_answered_or_need_reset(table, heads, words):
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
    dev = make_pmem(lambda: True)
    rig = make_rig(dev)
    try:
        [vq] = await rig.driver.init()
        for i, w in enumerate(words):
            rig.mem.write_u32(0x100000 + 4 * i, w)
        for index, addr, length, flags, nxt in table:
            addr = 0x100000 + addr % 16 if addr % 3 == 0 else addr % (rig.mem.end + 0x1000)
            vq.write_desc(index, addr, length % 0x20000 if length % 2 else 4, flags, nxt)
        for h in heads:
            vq.offer(h)
        rig.driver.kick(vq)
        await asyncio.sleep(0.01)
        await settle(10)
        assert errors == []
        if not rig.driver.status & DEVICE_NEEDS_RESET:
            used = vq.take_used()
            used += [] if len(used) == len(heads) else await rig.driver.wait_used(vq, len(heads) - len(used), 2)
            assert sorted(h for h, _ in used) == sorted(heads)
            assert all(n in (0, 4) for _, n in used)
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        dev.deactivate()
        rig.close()
