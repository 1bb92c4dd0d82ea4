"""virtio-balloon through the transport, driven by the fake driver."""

from __future__ import annotations

import asyncio
import mmap
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.balloon import Balloon, BalloonError
from asyncvmm.devices.virtio.balloon.protocol import (
    STAT,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    parse_stats,
    pfn_ranges,
    queue_roles,
)
from asyncvmm.devices.virtio.mmio import VIRTIO_MMIO_INT_CONFIG
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET, VIRTIO_ID_BALLOON, bit
from asyncvmm.memory import GuestMemory, GuestMemoryError
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.conftest import MEM_SIZE, make_rig

CONFIG_BASE = 0x100
MEM_MIB = MEM_SIZE >> 20


def balloon(**kw) -> Balloon:
    args = dict(amount_mib=0, deflate_on_oom=False, stats_polling_interval_s=0, free_page_reporting=False,
                mem_size_mib=MEM_MIB)
    args.update(kw)
    return Balloon(**args)


def pfn_array(mem, addr, pfns):
    mem.write(addr, struct.pack(f"<{len(pfns)}I", *pfns))
    return Buf(addr, 4 * len(pfns))


def stats_buffer(mem, addr, entries):
    mem.write(addr, b"".join(STAT.pack(tag, value) for tag, value in entries))
    return Buf(addr, STAT.size * len(entries))


@pytest.fixture
async def rig_and_dev():
    made = []

    async def make(**kw):
        dev = balloon(**kw)
        rig = make_rig(dev)
        vqs = await rig.driver.init()
        made.append((rig, dev))
        return rig, dev, vqs
    yield make
    for rig, dev in made:
        dev.deactivate()
        rig.close()


def test_identity_and_features():
    assert Balloon.device_type == VIRTIO_ID_BALLOON == 5
    assert balloon().num_queues == 2
    assert balloon(stats_polling_interval_s=1).num_queues == 3
    assert balloon(stats_polling_interval_s=1, free_page_reporting=True).num_queues == 4
    f = balloon(deflate_on_oom=True, stats_polling_interval_s=1, free_page_reporting=True).avail_features
    assert f & bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and f & bit(VIRTIO_BALLOON_F_STATS_VQ)
    assert f & bit(VIRTIO_BALLOON_F_PAGE_REPORTING)
    assert balloon().avail_features & 0xFF == 0


def test_queue_roles_skip_absent_queues():
    assert queue_roles(0) == {0: "inflate", 1: "deflate"}
    assert queue_roles(bit(VIRTIO_BALLOON_F_PAGE_REPORTING)) == {0: "inflate", 1: "deflate", 2: "reporting"}
    both = bit(VIRTIO_BALLOON_F_STATS_VQ) | bit(VIRTIO_BALLOON_F_PAGE_REPORTING)
    assert queue_roles(both) == {0: "inflate", 1: "deflate", 2: "stats", 3: "reporting"}


def test_pfn_ranges_merge_and_sort():
    data = struct.pack("<6I", 7, 5, 6, 6, 100, 2)
    assert pfn_ranges(data) == [(0x2000, 0x1000), (0x5000, 0x3000), (100 << 12, 0x1000)]
    assert pfn_ranges(b"") == []


def test_parse_stats_counts_unknown_tags_and_ignores_a_partial_entry():
    data = STAT.pack(4, 123) + STAT.pack(99, 1) + STAT.pack(5, 456) + b"\x01\x02"
    assert parse_stats(data) == ({"free_memory": 123, "total_memory": 456}, 1)


async def test_config_space_target_and_actual(rig_and_dev):
    rig, dev, _ = await rig_and_dev(amount_mib=3)
    assert rig.driver.read32(CONFIG_BASE) == 3 * 256
    rig.transport.write(CONFIG_BASE + 4, struct.pack("<I", 300))
    assert dev.actual_pages == 300 and rig.driver.read32(CONFIG_BASE + 4) == 300
    rig.transport.write(CONFIG_BASE, struct.pack("<I", 1))       # num_pages is the device's
    assert rig.driver.read32(CONFIG_BASE) == 3 * 256
    rig.driver.ack_interrupts()
    dev.update_size(5)
    assert rig.driver.read32(CONFIG_BASE) == 5 * 256
    assert rig.driver.ack_interrupts() & VIRTIO_MMIO_INT_CONFIG


async def test_update_size_refusals(rig_and_dev):
    with pytest.raises(BalloonError, match="Device not activated yet."):
        balloon().update_size(1)
    rig, dev, _ = await rig_and_dev()
    with pytest.raises(BalloonError, match=f"Requested memory should be less than {MEM_MIB + 1}MiB"):
        dev.update_size(MEM_MIB + 1)
    assert dev.num_pages == 0


async def test_inflate_discards_pages_and_deflate_answers(rig_and_dev):
    rig, dev, (inflate, deflate) = await rig_and_dev()
    page = 0x400000
    rig.mem.write(page, b"x" * 0x2000)
    head = inflate.add_chain([pfn_array(rig.mem, 0x200000, [page >> 12, (page >> 12) + 1])])
    inflate.offer(head)
    rig.driver.kick(inflate)
    assert await rig.driver.wait_used(inflate, 1) == [(head, 0)]
    assert rig.mem.read(page, 0x2000) == bytes(0x2000)
    assert dev.metrics.inflate_count == 1 and dev.metrics.event_fails == 0
    head = deflate.add_chain([pfn_array(rig.mem, 0x201000, [page >> 12])])
    deflate.offer(head)
    rig.driver.kick(deflate)
    assert await rig.driver.wait_used(deflate, 1) == [(head, 0)]
    assert dev.metrics.deflate_count == 1


async def test_pfns_outside_guest_memory_are_skipped_and_counted(rig_and_dev):
    rig, dev, (inflate, _) = await rig_and_dev()
    rig.mem.write(0x300000, b"keep")
    head = inflate.add_chain([pfn_array(rig.mem, 0x200000, [0xFFFF_FFFF, MEM_SIZE >> 12, 0x300])])
    inflate.offer(head)
    rig.driver.kick(inflate)
    assert await rig.driver.wait_used(inflate, 1) == [(head, 0)]
    assert dev.metrics.event_fails == 2
    assert rig.mem.read(0x300000, 4) == bytes(4)          # the good PFN was still given back


@pytest.mark.parametrize("bufs", [
    [Buf(0x200000, 6)],                                   # not whole le32s
    [Buf(0x200000, 4 * 257)],                             # more PFNs than Linux ever sends
    [Buf(0x200000, 8, True)],                             # device-writable
    [Buf(MEM_SIZE - 4, 8)],                               # runs off guest memory
])
async def test_unusable_inflate_chains_are_answered_and_counted(rig_and_dev, bufs):
    rig, dev, (inflate, _) = await rig_and_dev()
    rig.mem.write(0x200000, struct.pack("<I", 0x300))
    rig.mem.write(0x300000, b"keep")
    head = inflate.add_chain(bufs)
    inflate.offer(head)
    rig.driver.kick(inflate)
    assert await rig.driver.wait_used(inflate, 1) == [(head, 0)]
    assert dev.metrics.event_fails == 1
    assert rig.mem.read(0x300000, 4) == b"keep"


async def test_stats_protocol(rig_and_dev):
    rig, dev, (_, _, statsq) = await rig_and_dev(stats_polling_interval_s=1, amount_mib=2)
    head = statsq.add_chain([stats_buffer(rig.mem, 0x200000, [(4, 1000), (5, 9000), (77, 1)])])
    statsq.offer(head)
    rig.driver.kick(statsq)
    await settle()
    assert statsq.take_used() == []                       # held until the next update is due
    got = dev.stats()
    assert got["free_memory"] == 1000 and got["total_memory"] == 9000
    assert got["target_pages"] == 512 and got["target_mib"] == 2 and got["actual_pages"] == 0
    assert dev.metrics.stats_updates_count == 1 and dev.metrics.stats_update_fails == 1
    dev.update_stats_polling_interval(5)                  # a new interval asks for fresh numbers at once
    assert await rig.driver.wait_used(statsq, 1) == [(head, 0)]
    with pytest.raises(BalloonError, match="Statistics cannot be enabled/disabled after activation."):
        dev.update_stats_polling_interval(0)


async def test_stats_timer_returns_the_buffer(rig_and_dev):
    rig, dev, (_, _, statsq) = await rig_and_dev(stats_polling_interval_s=1)
    head = statsq.add_chain([stats_buffer(rig.mem, 0x200000, [(4, 1)])])
    statsq.offer(head)
    rig.driver.kick(statsq)
    await settle()
    dev.handler._timer.cancel()
    dev.handler._on_stats_timer()                         # what the loop runs after the interval
    assert await rig.driver.wait_used(statsq, 1) == [(head, 0)]
    assert dev.handler._timer is not None                 # and it runs again


async def test_a_second_stats_buffer_returns_the_first(rig_and_dev):
    rig, dev, (_, _, statsq) = await rig_and_dev(stats_polling_interval_s=1)
    first = statsq.add_chain([stats_buffer(rig.mem, 0x200000, [(4, 1)])])
    second = statsq.add_chain([stats_buffer(rig.mem, 0x201000, [(4, 2)]), Buf(0x202000, 1 << 20)])
    statsq.offer(first)
    statsq.offer(second)
    rig.driver.kick(statsq)
    assert await rig.driver.wait_used(statsq, 1) == [(first, 0)]
    assert dev.stats()["free_memory"] == 1                # the oversized buffer was not read
    assert dev.metrics.stats_update_fails == 1


def test_stats_disabled():
    with pytest.raises(BalloonError, match="Received stats query when stats are disabled."):
        balloon().stats()
    with pytest.raises(BalloonError, match="Statistics cannot be enabled/disabled after activation."):
        balloon().update_stats_polling_interval(1)


async def test_free_page_reporting_discards_reported_ranges(rig_and_dev):
    rig, dev, (_, _, report) = await rig_and_dev(free_page_reporting=True)
    rig.mem.write(0x400000, b"y" * 0x200000)
    head = report.add_chain([Buf(0x400000, 0x200000, True), Buf(0x900001, 0x1000, True)])
    report.offer(head)
    rig.driver.kick(report)
    assert await rig.driver.wait_used(report, 1) == [(head, 0)]
    assert rig.mem.read(0x400000, 0x200000) == bytes(0x200000)
    assert dev.metrics.free_page_report_count == 1 and dev.metrics.free_page_report_freed == 0x200000
    assert dev.metrics.free_page_report_fails == 1        # the unaligned one


def _rss_of(buf: mmap.mmap) -> int:
    """The resident bytes of ``buf``'s mapping, from /proc/self/smaps."""
    addr = GuestMemory.from_buffers([(0, buf)]).regions[0].host_addr
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        start = int(line.split("-", 1)[0], 16) if "-" in line.split(" ", 1)[0] else None
        if start == addr:
            for detail in lines[i + 1:]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1]) << 10
    raise AssertionError("mapping not found")


async def test_inflate_really_frees_host_memory():
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    dev = balloon()
    rig = make_rig(dev, mem=mem)
    try:
        inflate, _ = await rig.driver.init()
        region = mem.regions[0]
        target = 0x800000
        mem.fill(target, 4 << 20, 0xAB)                    # 4 MiB the guest touched
        before = _rss_of(region.buffer)
        pfns = list(range(target >> 12, (target + (4 << 20)) >> 12))
        for i in range(0, len(pfns), 256):
            head = inflate.add_chain([pfn_array(mem, 0x200000 + i * 4, pfns[i:i + 256])])
            inflate.offer(head)
        rig.driver.kick(inflate)
        await rig.driver.wait_used(inflate, len(pfns) // 256)
        after = _rss_of(region.buffer)
        assert before - after >= (4 << 20) - 0x10000, (before, after)
        assert mem.read(target, 16) == bytes(16)
    finally:
        dev.deactivate()
        rig.close()


def test_discard_is_bounds_checked_and_page_aligned():
    mem = GuestMemory.from_buffers([(0, bytearray(0x4000)), (0x4000, bytearray(0x4000))])
    mem.write(0x3000, b"a" * 0x1000)
    mem.write(0x4000, b"a" * 0x1000)
    mem.discard(0x3000, 0x2000)                            # across adjacent regions
    assert mem.read(0x3000, 0x1000) + mem.read(0x4000, 0x1000) == bytes(0x2000)
    mem.write(0x1000, b"b")
    for gpa, length in ((0x7000, 0x2000), (0x1001, 0x1000), (0x1000, 0x10), (0x10000, 0x1000)):
        with pytest.raises(GuestMemoryError):
            mem.discard(gpa, length)
    assert mem.read(0x1000, 1) == b"b"                     # a refused range discards nothing


async def test_reset_drops_the_held_stats_buffer_and_the_timer(rig_and_dev):
    rig, dev, (_, _, statsq) = await rig_and_dev(stats_polling_interval_s=1)
    statsq.offer(statsq.add_chain([stats_buffer(rig.mem, 0x200000, [(4, 1)])]))
    rig.driver.kick(statsq)
    await settle()
    handler = dev.handler
    await rig.driver.reset()
    assert dev.handler is None and handler._timer is None and handler.held_stats is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                st.integers(0, 7), st.integers(0, 300)), max_size=10),
       heads=st.lists(st.integers(0, 300), min_size=1, max_size=6),
       queue=st.integers(0, 4))
async def test_hostile_chains_are_answered_or_need_reset(table, heads, queue):
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
    dev = balloon(stats_polling_interval_s=1, free_page_hinting=True, free_page_reporting=True)
    rig = make_rig(dev)
    try:
        vqs = await rig.driver.init()
        vq = vqs[queue]
        for index, addr, length, flags, nxt in table:
            vq.write_desc(index, addr % (rig.mem.end + 0x1000), length % 0x20000, flags, nxt)
        for h in heads:
            vq.offer(h)
        rig.driver.kick(vq)
        await settle(10)
        assert errors == []
        if not rig.driver.status & DEVICE_NEEDS_RESET and queue != 2:
            assert [h for h, _ in vq.take_used()] == heads
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        dev.deactivate()
        rig.close()


# -- free page hinting (§5.5.6.4) ------------------------------------------------------------

def cmd_buffer(mem, addr, cmd):
    mem.write(addr, struct.pack("<I", cmd))
    return Buf(addr, 4)


def test_hinting_queue_comes_after_stats_and_before_reporting():
    every = (bit(VIRTIO_BALLOON_F_STATS_VQ) | bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
             | bit(VIRTIO_BALLOON_F_PAGE_REPORTING))
    assert queue_roles(every) == {0: "inflate", 1: "deflate", 2: "stats", 3: "hinting", 4: "reporting"}
    assert queue_roles(bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)) == {0: "inflate", 1: "deflate", 2: "hinting"}
    dev = balloon(free_page_hinting=True)
    assert dev.num_queues == 3 and dev.avail_features & bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)


def test_hinting_refusals():
    for op in (lambda d: d.start_hinting(True), lambda d: d.stop_hinting(), lambda d: d.hinting_status()):
        with pytest.raises(BalloonError, match="Attempting to use hinting when not enabled"):
            op(balloon())
    with pytest.raises(BalloonError, match="Device not activated yet."):
        balloon(free_page_hinting=True).start_hinting(True)


async def test_hinting_run(rig_and_dev):
    rig, dev, (_, _, hintq) = await rig_and_dev(free_page_hinting=True)
    assert rig.driver.read32(CONFIG_BASE + 8) == 0                    # STOP until a run starts
    assert dev.hinting_status() == {"host_cmd": 0}
    rig.driver.ack_interrupts()
    dev.start_hinting(acknowledge_on_stop=True)
    assert rig.driver.read32(CONFIG_BASE + 8) == 2
    assert rig.driver.ack_interrupts() & VIRTIO_MMIO_INT_CONFIG
    rig.mem.write(0x400000, b"h" * 0x200000)
    rig.mem.write(0x800000, b"k" * 0x1000)
    chains = [hintq.add_chain([Buf(0x800000, 0x1000, True)]),           # before the driver names the run
              hintq.add_chain([cmd_buffer(rig.mem, 0x200000, 2)]),
              hintq.add_chain([Buf(0x400000, 0x200000, True)])]
    for head in chains:
        hintq.offer(head)
    rig.driver.kick(hintq)
    assert [h for h, _ in await rig.driver.wait_used(hintq, 3)] == chains
    assert rig.mem.read(0x400000, 0x200000) == bytes(0x200000)
    assert rig.mem.read(0x800000, 1) == b"k"                           # not part of the run
    assert dev.metrics.free_page_hint_count == 1 and dev.metrics.free_page_hint_freed == 0x200000
    assert dev.hinting_status() == {"host_cmd": 2, "guest_cmd": 2}
    stop = hintq.add_chain([cmd_buffer(rig.mem, 0x200100, 0)])
    hintq.offer(stop)
    rig.driver.kick(hintq)
    await rig.driver.wait_used(hintq, 1)
    assert dev.hinting_status() == {"host_cmd": 1, "guest_cmd": 0}     # acknowledged with DONE
    assert rig.driver.read32(CONFIG_BASE + 8) == 1
    late = hintq.add_chain([Buf(0x800000, 0x1000, True)])              # after DONE: never discarded
    hintq.offer(late)
    rig.driver.kick(hintq)
    await rig.driver.wait_used(hintq, 1)
    assert rig.mem.read(0x800000, 1) == b"k"
    dev.start_hinting(acknowledge_on_stop=False)
    assert dev.hinting_status()["host_cmd"] == 3
    stop = hintq.add_chain([cmd_buffer(rig.mem, 0x200200, 0)])
    hintq.offer(stop)
    rig.driver.kick(hintq)
    await rig.driver.wait_used(hintq, 1)
    assert dev.hinting_status() == {"host_cmd": 3, "guest_cmd": 0}     # no acknowledgement asked
    dev.stop_hinting()
    assert dev.hinting_status()["host_cmd"] == 1


def test_hinting_run_ids_skip_stop_and_done():
    dev = balloon(free_page_hinting=True)
    dev.handler = object()                                              # activated, as far as the API sees
    dev.last_run_id = 0xFFFF_FFFF
    dev.start_hinting(True)
    assert dev.hint_cmd_id == 2
