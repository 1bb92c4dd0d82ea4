"""virtio-net receive: tap frames into guest chains, merged buffers, back-pressure when the guest is full."""

from __future__ import annotations

import asyncio
import struct

import pytest

from asyncvmm.devices.virtio.net.header import (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
                                                VIRTIO_NET_HDR, VIRTIO_NET_HDR_F_DATA_VALID,
                                                VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                                VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_SIZE)
from asyncvmm.devices.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTQ_DESC_F_WRITE, bit
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.net.conftest import RX_BUF, frame, make_net_rig, seq_of

NO_MRG = ~bit(VIRTIO_NET_F_MRG_RXBUF)


def num_buffers(hdr: bytes) -> int:
    return struct.unpack_from("<H", hdr, 10)[0]


@pytest.mark.parametrize("mask", [NO_MRG, ~0], ids=["plain", "mrg_rxbuf"])
async def test_a_frame_lands_in_one_chain_with_num_buffers_1(mask):
    n = await make_net_rig(mask=mask, post=4)
    n.tap.inject(frame(1514, seq=3))
    [(hdr, data)] = await n.wait_received(1)
    assert data == frame(1514, seq=3)
    assert num_buffers(hdr) == 1
    m = n.dev.metrics
    assert (m.rx_packets_count, m.rx_count, m.rx_bytes_count) == (1, 1, 1514)
    assert n.rig.irq.count >= 1
    n.close()


async def test_without_mrg_a_chain_of_several_descriptors_holds_the_frame():
    n = await make_net_rig(mask=NO_MRG)
    n.post_rx(2, size=4 * 1024, parts=4)
    n.tap.inject(frame(3000))
    [(hdr, data)] = await n.wait_received(1)
    assert data == frame(3000) and num_buffers(hdr) == 1
    n.close()


async def test_mrg_rxbuf_spreads_a_large_frame_over_chains():
    n = await make_net_rig(post=0)
    n.post_rx(8, size=1536)
    n.tap.inject(frame(5000, seq=9))
    used = await n.driver.wait_used(n.rxq, 4)
    # 5012 bytes with the header: three full 1536-byte chains and the rest.
    assert [length for _, length in used] == [1536, 1536, 1536, 5012 - 3 * 1536]
    # Put them back so received() can decode them (take_used freed them).
    hdr_and_frame = b"".join(n._read_chain(head, length) for head, length in used)
    assert num_buffers(hdr_and_frame) == 4
    assert hdr_and_frame[VNET_HDR_SIZE:] == frame(5000, seq=9)
    n.close()


async def test_mrg_frame_over_one_descriptor_chains_and_a_walked_chain_between():
    # One-descriptor chains (Linux's) are read straight from the table; a chain of
    # several descriptors between them takes the general walk: the frame spans all
    # three in ring order.
    n = await make_net_rig(post=0)
    n.post_rx(1, size=1024)
    n.post_rx(1, size=2048, parts=2)
    n.post_rx(2, size=1024)
    n.tap.inject(frame(3500, seq=5))
    used = await n.driver.wait_used(n.rxq, 3)
    assert [length for _, length in used] == [1024, 2048, 3512 - 3072]
    hdr_and_frame = b"".join(n._read_chain(head, length) for head, length in used)
    assert num_buffers(hdr_and_frame) == 3
    assert hdr_and_frame[VNET_HDR_SIZE:] == frame(3500, seq=5)
    assert n.dev.metrics.rx_fails == 0
    n.close()


async def test_mrg_frames_wait_for_enough_buffers_then_arrive_whole():
    n = await make_net_rig()
    n.post_rx(2, size=1536)
    n.tap.inject(frame(4000, seq=1))
    await settle(10)
    assert n.received() == []                    # 3072 bytes of room for 4012: it waits
    assert n.dev.metrics.no_rx_avail_buffer == 1 and not n.handler.reading
    n.post_rx(1, size=1536)
    [(hdr, data)] = await n.wait_received(1)
    assert data == frame(4000, seq=1) and num_buffers(hdr) == 3
    n.close()


async def test_without_mrg_a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_reused():
    n = await make_net_rig(mask=NO_MRG, post=1)
    n.tap.inject(frame(RX_BUF + 100, seq=1))
    n.tap.inject(frame(200, seq=2))
    [(hdr, data)] = await n.wait_received(1)
    assert seq_of(data) == 2
    assert n.dev.metrics.rx_fails == 1
    n.close()


@pytest.mark.parametrize("mask", [NO_MRG, ~0], ids=["plain", "mrg_rxbuf"])
@pytest.mark.parametrize("event_idx", [True, False])
async def test_exhaustion_holds_frames_in_the_tap_then_resumes_on_kick(mask, event_idx):
    if not event_idx:
        mask &= ~bit(VIRTIO_F_EVENT_IDX)
    n = await make_net_rig(mask=mask)
    n.post_rx(4)
    total = 50
    for i in range(total):
        assert n.tap.inject(frame(600, seq=i))
    got = await n.wait_received(4)
    await settle(10)
    assert n.received() == []
    assert not n.handler.reading                 # back-pressure: the tap is not read
    assert n.handler.held is None                # and the rest wait in the tap's queue
    assert n.dev.metrics.no_rx_avail_buffer == 1
    while len(got) < total:
        n.post_rx(7)                             # the guest refills and kicks
        got += await n.wait_received(min(7, total - len(got)))
    assert [seq_of(d) for _, d in got] == list(range(total))
    assert all(d == frame(600, seq=i) for i, (_, d) in enumerate(got))
    assert n.dev.metrics.rx_fails == 0
    await settle(10)
    assert n.handler.held is None
    n.close()


async def test_no_tap_read_while_the_guest_has_no_buffers():
    n = await make_net_rig()
    n.tap.inject(frame(100, seq=5))
    await settle(10)
    assert n.handler.held is None                # nothing was read: no buffer to put it in
    assert n.dev.metrics.rx_count == 0
    n.post_rx(1)
    [(hdr, data)] = await n.wait_received(1)
    assert seq_of(data) == 5
    n.close()


async def test_checksum_flags_pass_through_only_with_guest_csum():
    hdr = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)
    n = await make_net_rig(post=2)
    n.tap.inject(frame(100), hdr)
    [(got, _)] = await n.wait_received(1)
    assert got[0] == VIRTIO_NET_HDR_F_DATA_VALID
    n.close()
    n = await make_net_rig(mask=~bit(VIRTIO_NET_F_GUEST_CSUM), post=2)
    n.tap.inject(frame(100), VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0))
    [(got, _)] = await n.wait_received(1)
    assert got[0] == 0
    n.close()


async def test_gso_frames_for_a_guest_without_gso_are_dropped():
    n = await make_net_rig(mask=NO_MRG & ~bit(7) & ~bit(8) & ~bit(10), post=2)
    n.tap.inject(frame(1000, seq=1), VIRTIO_NET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0))
    n.tap.inject(frame(100, seq=2))
    [(_, data)] = await n.wait_received(1)
    assert seq_of(data) == 2 and n.dev.metrics.rx_fails == 1
    n.close()


async def test_unusable_receive_chains_are_returned_empty_and_counted():
    n = await make_net_rig()
    readable = n.rxq.add_chain([Buf(n.rig.alloc.alloc(2048), 2048, write=False)])
    n.rxq.offer(readable)
    tiny = n.rxq.add_chain([Buf(n.rig.alloc.alloc(8), 8, write=True)])
    n.rxq.offer(tiny)
    outside = n.rxq.free.pop(0)
    n.rxq.write_desc(outside, 0x4000_0000, 2048, VIRTQ_DESC_F_WRITE)
    n.rxq.offer(outside)
    n.post_rx(1)
    n.tap.inject(frame(300, seq=4))
    used = await n.driver.wait_used(n.rxq, 4)
    assert used[:3] == [(readable, 0), (tiny, 0), (outside, 0)]
    assert used[3][1] == VNET_HDR_SIZE + 300
    assert n.dev.metrics.rx_fails == 3 and not n.needs_reset()
    n.close()


async def test_an_avail_index_beyond_the_ring_needs_reset():
    n = await make_net_rig()
    n.rxq.set_avail_idx(n.rxq.size + 5)
    n.driver.kick(n.rxq)
    await settle(10)
    assert n.needs_reset()
    assert n.dev.metrics.event_fails == 1
    assert not n.handler.reading
    n.close()


class BrokenTap:
    """A tap whose reads fail (the interface was deleted under us)."""

    def __init__(self, inner):
        self.inner = inner
        self.fail = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read_into(self, buf):
        if self.fail:
            raise OSError(77, "File descriptor in bad state")
        return self.inner.read_into(buf)


async def test_tap_read_failures_back_off_and_recover(monkeypatch):
    from asyncvmm.devices.virtio.net import handler as net_handler
    from tests.unit.devices.virtio.net.conftest import SocketTap

    monkeypatch.setattr(net_handler, "TAP_RETRY_S", 0.01)
    inner = SocketTap()
    tap = BrokenTap(inner)
    n = await make_net_rig(tap=tap, post=2)
    inner.inject(frame(100, seq=1))
    await settle(10)
    assert n.dev.metrics.tap_read_fails >= 1 and not n.handler.reading
    tap.fail = False
    [(hdr, data)] = await n.wait_received(1)
    assert seq_of(data) == 1
    n.close()


async def test_a_broken_tx_ring_also_stops_reading_the_tap():
    n = await make_net_rig(post=2)
    assert n.handler.reading
    n.txq.set_avail_idx(n.txq.size + 1)
    n.driver.kick(n.txq)
    await settle(10)
    assert n.needs_reset()
    # Halted, waiting for the driver's reset: a readable tap must not keep waking the loop.
    n.tap.inject(frame(100))
    assert not asyncio.get_running_loop().remove_reader(n.tap.fileno())
    assert not n.handler.reading
    n.close()


def test_merged_used_elements_are_published_with_one_index_store(guest_mem):
    from asyncvmm.devices.virtio.net.rx import add_used_together
    from asyncvmm.devices.virtio.queue import Queue

    q = Queue(max_size=8, size=8, ready=True, desc_table=0x1000, avail_ring=0x2000, used_ring=0x3000)
    q.validate(guest_mem)
    q.next_used = 0xFFFE                       # the free-running index wraps inside the batch
    guest_mem.write_u16(0x3002, 0xFFFE)
    stores = []
    import asyncvmm.devices.virtio.net.rx as rx_mod
    original = rx_mod.store_u16

    def counting_store_u16(buf, offset, value):
        if offset == 2:
            stores.append(value)
        original(buf, offset, value)
    rx_mod.store_u16 = counting_store_u16
    try:
        add_used_together(guest_mem, q, [(3, 1536), (4, 1536), (5, 100)])
    finally:
        rx_mod.store_u16 = original
    assert stores == [1]                       # one publication, after all three elements
    assert q.next_used == 1 and guest_mem.read_u16(0x3002) == 1
    elems = [(guest_mem.read_u32(0x3004 + 8 * (i % 8)), guest_mem.read_u32(0x3008 + 8 * (i % 8)))
             for i in (0xFFFE, 0xFFFF, 0x10000)]
    assert elems == [(3, 1536), (4, 1536), (5, 100)]
