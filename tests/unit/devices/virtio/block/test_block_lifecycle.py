"""virtio-block under pressure: resets with io_uring I/O in flight, throttling, full engines, hostile rings."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.block.conftest import make_block_rig, require_io_uring
from tests.unit.devices.virtio.block.helpers import header


class PipeFile:
    """A backing "file" whose reads stay in the kernel until the test writes into it.

    Stands in for the device's :class:`BackingFile` (the capacity still comes
    from the real disk): an io_uring read of a pipe completes only when the
    pipe has data, so the test decides how long a request stays in flight.
    """

    path = "<pipe>"

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.users = 0

    def acquire(self) -> int:
        self.users += 1
        return self.r

    def release(self) -> None:
        self.users -= 1

    def retire(self) -> None:
        pass

    def feed(self, data: bytes) -> None:
        os.write(self.w, data)

    def left(self) -> bytes:
        """What no read took."""
        try:
            return os.read(self.r, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


async def pipe_rig(disk, **kw):
    require_io_uring()
    b = await make_block_rig(disk, io_engine="Async", **kw)
    pipe = PipeFile()
    old, b.dev.file = b.dev.file, pipe
    old.retire()
    return b, pipe


def read_request(b, sector=0):
    bufs, answer = b.lay_out(header(rq.VIRTIO_BLK_T_IN, sector), 513)
    return b.offer(bufs), answer


async def until(condition, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def in_flight(b) -> int:
    return b.dev.handler.engine.in_flight if b.dev.handler else 0


async def test_reset_waits_for_in_flight_io_and_drops_its_completion(disk):
    b, pipe = await pipe_rig(disk)
    _, answer = read_request(b)
    await until(lambda: in_flight(b) == 1, "the read to reach the kernel")
    gate = b.dev.handler.act.gate
    # The kernel finishes the read 50 ms from now, on another thread.
    feeder = threading.Timer(0.05, pipe.feed, (b"\x5a" * 512,))
    feeder.start()
    await b.driver.reset()          # the status write (on the loop) returns once the kernel is done
    assert answer.read(b.mem)[:512] == b"\x5a" * 512   # so the data is there already...
    assert gate._inside == 0
    feeder.join()
    await asyncio.sleep(0.02)
    await settle(20)
    assert b.vq.used_idx == 0                    # ...but the old activation's answer was dropped
    assert answer.read(b.mem)[512:] == b"\xEE"
    assert b.dev.handler is None and pipe.users == 0
    m = b.dev.metrics
    assert (m.discarded_reqs_count, m.io_uring_count, m.read_count) == (1, 0, 0)
    # A fresh initialisation works, on a fresh engine.
    b.rig.alloc.next = 0x1000
    [b.vq] = await b.driver.init()
    pipe.feed(b"\x33" * 512)
    status, data = await b.read(0, 512)
    assert status == rq.VIRTIO_BLK_S_OK and data == b"\x33" * 512
    assert (m.io_uring_count, m.read_count) == (1, 1)
    b.dev.close()
    b.rig.close()
    pipe.close()


async def test_requests_behind_a_reset_never_start(disk):
    b, pipe = await pipe_rig(disk, async_depth=1)
    for i in range(3):
        read_request(b, i)
    await until(lambda: b.dev.metrics.io_engine_throttled_events >= 1, "the full engine to stall the queue")
    assert in_flight(b) == 1
    feeder = threading.Timer(0.02, pipe.feed, (bytes(512),))
    feeder.start()
    await b.driver.reset()
    feeder.join()
    pipe.feed(b"late" * 256)
    await asyncio.sleep(0.02)
    await settle(20)
    assert pipe.left() == b"late" * 256          # the two stalled reads never started
    assert b.vq.used_idx == 0
    assert b.dev.metrics.discarded_reqs_count == 1
    b.dev.close()
    b.rig.close()
    pipe.close()


async def test_full_engine_stalls_the_queue_then_resumes(disk):
    b, pipe = await pipe_rig(disk, async_depth=2)
    for i in range(5):
        read_request(b, i)
    await until(lambda: b.dev.metrics.io_engine_throttled_events >= 1, "the full engine to stall the queue")
    assert in_flight(b) == 2
    assert b.dev.metrics.remaining_reqs_count >= 3
    pipe.feed(bytes(5 * 512))
    used = await b.driver.wait_used(b.vq, 5)
    assert len(used) == 5
    m = b.dev.metrics
    assert (m.read_count, m.io_uring_count, m.discarded_reqs_count) == (5, 5, 0)
    b.dev.close()
    b.rig.close()
    pipe.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


@pytest.mark.parametrize("engine", ["Sync", "Async"])
async def test_ops_rate_limiter_throttles_then_the_timer_resumes(disk, engine):
    if engine == "Async":
        require_io_uring()
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


async def test_a_limiter_patched_in_throttles_the_usual_framing_too(disk):
    """A Sync drive without a limiter takes its usual requests on the fast path; a PATCH that
    adds one must bring them under it."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    b = await make_block_rig(disk, io_engine="Sync", rate_limiter=limiter)
    status, _ = await b.read(0, 512, wcuts=[512])
    assert status == rq.VIRTIO_BLK_S_OK

    class Spec:                                     # PATCH {"ops": {"size": 2, "refill_time": 10}}
        bandwidth = None
        ops = type("B", (), {"size": 2, "refill_time": 10, "one_time_burst": None})()
    b.dev.update_rate_limiter(Spec())
    for i in range(4):
        bufs, _ = b.lay_out(header(rq.VIRTIO_BLK_T_IN, i), 513, wcuts=[512])
        b.offer(bufs)
    assert len(await b.driver.wait_used(b.vq, 2)) == 2
    await settle()
    assert b.vq.take_used() == []
    assert b.dev.metrics.rate_limiter_throttled_events >= 1 and b.dev.metrics.read_count == 3
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
