"""virtio-block under pressure: resets with I/O in flight, throttling, full engines, hostile rings."""

from __future__ import annotations

import asyncio
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.block.conftest import disk_bytes, make_block_rig
from tests.unit.devices.virtio.block.helpers import header


class BlockingSync:
    """An fdatasync that waits until the test lets it go: an op held in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("test never released the flush")


def flush_request(b):
    bufs, answer = b.lay_out(header(rq.VIRTIO_BLK_T_FLUSH), 1)
    return b.offer(bufs), answer


async def test_reset_waits_for_in_flight_io_and_drops_its_completion(disk):
    sync = BlockingSync()
    b = await make_block_rig(disk, cache_type="Writeback", io_engine="Async", async_backend="threads", fdatasync=sync)
    _, answer = flush_request(b)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, sync.entered.wait, 10)
    # The guest resets from a vCPU thread; the status write must not return while the op runs.
    reset = loop.run_in_executor(None, b.driver.write32, r.VIRTIO_MMIO_STATUS, 0)
    await asyncio.sleep(0.05)
    assert not reset.done()
    sync.release.set()
    await asyncio.wait_for(reset, 10)
    await settle(20)
    assert b.vq.used_idx == 0                    # the completion of the old activation was dropped
    assert answer.read(b.mem) == b"\xEE"
    assert b.dev.handler is None
    # A fresh initialisation works, on a fresh engine.
    b.rig.alloc.next = 0x1000
    [b.vq] = await b.driver.init()
    status, data = await b.read(0, 512)
    assert status == rq.VIRTIO_BLK_S_OK and data == disk_bytes()[:512]
    b.dev.close()
    b.rig.close()


async def test_ops_queued_behind_a_reset_never_start(disk):
    sync = BlockingSync()
    b = await make_block_rig(disk, cache_type="Writeback", io_engine="Async", async_backend="threads", fdatasync=sync,
                             async_workers=1)
    for _ in range(3):
        flush_request(b)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, sync.entered.wait, 10)
    reset = loop.run_in_executor(None, b.driver.write32, r.VIRTIO_MMIO_STATUS, 0)
    await asyncio.sleep(0.02)
    sync.release.set()
    await asyncio.wait_for(reset, 10)
    await asyncio.sleep(0.05)
    assert sync.calls == 1
    assert b.vq.used_idx == 0
    b.dev.close()
    b.rig.close()


async def test_full_engine_stalls_the_queue_then_resumes(disk):
    sync = BlockingSync()
    b = await make_block_rig(disk, cache_type="Writeback", io_engine="Async", async_backend="threads", fdatasync=sync,
                             async_workers=2, async_depth=2)
    for _ in range(5):
        flush_request(b)
    await asyncio.get_running_loop().run_in_executor(None, sync.entered.wait, 10)
    await settle()
    assert b.dev.metrics.io_engine_throttled_events >= 1
    assert b.dev.metrics.remaining_reqs_count >= 3
    sync.release.set()
    used = await b.driver.wait_used(b.vq, 5)
    assert len(used) == 5
    assert b.dev.metrics.flush_count == 5
    b.dev.close()
    b.rig.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


@pytest.mark.parametrize("engine", ["Sync", "Async"])
async def test_ops_rate_limiter_throttles_then_the_timer_resumes(disk, engine):
    clock = FakeClock()
    limiter = RateLimiter(ops=TokenBucket(2, 10, clock=clock), clock=clock)
    b = await make_block_rig(disk, io_engine=engine, rate_limiter=limiter)
    heads = []
    for i in range(4):
        bufs, _ = b.lay_out(header(rq.VIRTIO_BLK_T_IN, i), 513)
        heads.append(b.offer(bufs))
    assert len(await b.driver.wait_used(b.vq, 2)) == 2
    await settle()
    assert b.vq.take_used() == []
    m = b.dev.metrics
    assert m.rate_limiter_throttled_events >= 1 and m.read_count == 2
    clock.now += 10_000_000                       # one refill period: two more tokens
    assert len(await b.driver.wait_used(b.vq, 2)) == 2
    assert m.rate_limiter_event_count >= 1 and m.read_count == 4
    b.dev.close()
    b.rig.close()


async def test_bandwidth_limiter_counts_bytes_and_patch_disables_it(disk):
    clock = FakeClock()
    limiter = RateLimiter(bandwidth=TokenBucket(1024, 1000, clock=clock), clock=clock)
    b = await make_block_rig(disk, rate_limiter=limiter)
    for i in range(3):
        bufs, _ = b.lay_out(header(rq.VIRTIO_BLK_T_IN, i), 513)
        b.offer(bufs)
    assert len(await b.driver.wait_used(b.vq, 2)) == 2        # 2 x 512 bytes fit
    await settle()
    assert b.vq.take_used() == []

    class Spec:                                     # PATCH {"bandwidth": {"size": 0, ...}}
        bandwidth = type("B", (), {"size": 0, "refill_time": 0, "one_time_burst": None})()
        ops = None
    b.dev.update_rate_limiter(Spec())
    assert limiter.bandwidth is None
    assert len(await b.driver.wait_used(b.vq, 1)) == 1
    assert b.dev.metrics.update_count == 1
    b.dev.close()
    b.rig.close()


# -- hostile rings -------------------------------------------------------------

desc = st.tuples(
    st.one_of(st.integers(0x400000, 0x500000), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 2048), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),
    st.integers(0, 260),
)
header_bytes = st.builds(lambda t, s: struct.pack("<IIQ", t, 0, s),
                         st.sampled_from([0, 1, 4, 8, 11, 2**32 - 1]), st.integers(0, 2**64 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(st.tuples(st.integers(0, 255), desc), max_size=12),
       heads=st.lists(st.integers(0, 300), min_size=1, max_size=8),
       avail_jump=st.sampled_from([0, 0, 0, 300]),
       payload=header_bytes)
async def test_hostile_chains_never_escape_and_leave_an_answer_or_needs_reset(
        disk, loop_errors, table, heads, avail_jump, payload):
    b = await make_block_rig(disk, io_engine="Sync")
    try:
        mem = b.mem
        mem.write(0x400000, payload * 8)             # plausible headers where buffers point
        for index, (addr, length, flags, nxt) in table:
            b.vq.write_desc(index, addr, length, flags, nxt)
        for h in heads:
            b.vq.offer(h)
        if avail_jump:
            b.vq.set_avail_idx(b.vq.avail_idx + avail_jump)
        b.driver.kick(b.vq)
        await settle(10)
        assert loop_errors == []
        used = b.vq.take_used()
        if b.driver.status & DEVICE_NEEDS_RESET:
            return
        # Every offered chain was answered, in order, with a head that was offered.
        assert [h for h, _ in used] == heads
        for _, length in used:
            assert length <= 0xFFFF_FFFF
    finally:
        b.dev.close()
        b.rig.close()
