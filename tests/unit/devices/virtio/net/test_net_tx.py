"""virtio-net transmit: guest chains to tap frames, header passed through, bad chains answered."""

from __future__ import annotations

import pytest

from asyncvmm.devices.virtio.net.header import (VIRTIO_NET_HDR, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                                VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_SIZE)
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.net.conftest import SocketTap, frame, make_net_rig


@pytest.fixture
async def net():
    n = await make_net_rig()
    yield n
    n.close()


async def test_single_buffer_frame_reaches_the_tap_with_its_header(net):
    hdr = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0)
    head = net.transmit(frame(1514), hdr=hdr)
    [sent] = await net.wait_sent(1)
    assert sent == hdr + frame(1514)
    assert await net.driver.wait_used(net.txq, 1) == [(head, 0)]
    m = net.dev.metrics
    assert (m.tx_packets_count, m.tx_count, m.tx_bytes_count, m.tx_fails) == (1, 1, 1514, 0)
    assert m.tx_queue_event_count == 1


@pytest.mark.parametrize("cuts", [(VNET_HDR_SIZE,), (5,), (VNET_HDR_SIZE, 20, 21, 700), (3, 13, 14, 15)])
async def test_chained_buffers_are_gathered_in_order(net, cuts):
    net.transmit(frame(1000, seq=7), cuts=cuts)
    [sent] = await net.wait_sent(1)
    assert sent == bytes(VNET_HDR_SIZE) + frame(1000, seq=7)


async def test_indirect_chain(net):
    net.transmit(frame(300), cuts=(VNET_HDR_SIZE, 100), indirect=True)
    [sent] = await net.wait_sent(1)
    assert sent[VNET_HDR_SIZE:] == frame(300)


async def test_one_kick_sends_a_batch_in_order_with_one_interrupt(net):
    for i in range(40):
        net.transmit(frame(200, seq=i), kick=False)
    net.driver.kick(net.txq)
    sent = await net.wait_sent(40)
    assert [int.from_bytes(s[VNET_HDR_SIZE + 14:VNET_HDR_SIZE + 18], "big") for s in sent] == list(range(40))
    assert len(await net.driver.wait_used(net.txq, 40)) == 40
    await settle()
    assert net.rig.irq.count == 1
    assert net.dev.metrics.tx_queue_event_count == 1


async def test_a_kick_with_nothing_to_send_is_counted(net):
    net.driver.kick(net.txq)
    await settle()
    assert net.dev.metrics.no_tx_avail_buffer == 1


@pytest.mark.parametrize("bufs_of", [
    lambda n: [Buf(n.rig.alloc.alloc(64), 64, write=True)],                  # device-writable
    lambda n: n.lay_out(bytes(VNET_HDR_SIZE + 10)),                           # no Ethernet header
    lambda n: [Buf(0x2000_0000, 100)],                                        # outside guest memory
    lambda n: [Buf(n.rig.alloc.alloc(70_000), 70_000)],                       # larger than any frame
])
async def test_malformed_chains_are_answered_and_counted(net, bufs_of):
    bad = net.txq.add_chain(bufs_of(net))
    net.txq.offer(bad)
    good = net.transmit(frame(100), kick=False)
    net.driver.kick(net.txq)
    assert sorted(await net.driver.wait_used(net.txq, 2)) == sorted([(bad, 0), (good, 0)])
    [sent] = await net.wait_sent(1)
    assert sent[VNET_HDR_SIZE:] == frame(100)
    m = net.dev.metrics
    assert m.tx_malformed_frames == 1 and m.tx_fails == 1 and m.tx_packets_count == 1
    assert not net.needs_reset()


async def test_a_descriptor_loop_is_a_malformed_frame_not_a_hang(net):
    idx = net.txq.free.pop(0)
    addr = net.rig.alloc.alloc(64)
    net.txq.write_desc(idx, addr, 64, VIRTQ_DESC_F_NEXT, idx)
    net.txq.chain_descs[idx] = [idx]
    net.txq.offer(idx)
    net.driver.kick(net.txq)
    assert await net.driver.wait_used(net.txq, 1) == [(idx, 0)]
    assert net.dev.metrics.tx_malformed_frames == 1


async def test_readable_after_writable_is_malformed(net):
    a, b = net.txq.free.pop(0), net.txq.free.pop(0)
    addr = net.rig.alloc.alloc(128)
    net.txq.write_desc(a, addr, 64, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, b)
    net.txq.write_desc(b, addr + 64, 64, 0)
    net.txq.chain_descs[a] = [a, b]
    net.txq.offer(a)
    net.driver.kick(net.txq)
    assert await net.driver.wait_used(net.txq, 1) == [(a, 0)]
    assert net.dev.metrics.tx_malformed_frames == 1


class FailingTap(SocketTap):
    def writev(self, bufs):
        raise OSError(5, "Input/output error")          # e.g. the host took the link down


async def test_a_failing_tap_write_costs_the_frame_only():
    n = await make_net_rig(tap=FailingTap())
    heads = [n.transmit(frame(64, seq=i), kick=False) for i in range(3)]
    n.driver.kick(n.txq)
    assert sorted(await n.driver.wait_used(n.txq, 3)) == sorted((h, 0) for h in heads)
    m = n.dev.metrics
    assert m.tap_write_fails == 3 and m.tx_fails == 3 and m.tx_packets_count == 0
    assert not n.needs_reset()
    n.close()


async def test_a_full_tap_holds_frames_until_it_drains():
    n = await make_net_rig(tap=SocketTap(sndbuf=16 * 1024))
    count = 60
    for i in range(count):
        n.transmit(frame(1500, seq=i), kick=False)
    n.driver.kick(n.txq)
    await settle(10)
    assert n.txq.used_idx < count              # the tap filled up and TX waits for it
    first = n.tap.sent()                       # the peer reads: the tap drains
    rest = await n.wait_sent(count - len(first))
    got = [int.from_bytes(s[VNET_HDR_SIZE + 14:VNET_HDR_SIZE + 18], "big") for s in first + rest]
    assert got == list(range(count))           # none lost, none reordered
    assert len(await n.driver.wait_used(n.txq, count)) == count
    assert n.dev.metrics.tx_fails == 0
    n.close()


async def test_spoofed_source_mac_is_counted_not_dropped(net):
    net.transmit(frame(80, src=b"\x02\x99\x99\x99\x99\x99"))
    net.transmit(frame(80, src=bytes.fromhex("aafc00000001")))
    assert len(await net.wait_sent(2)) == 2
    assert net.dev.metrics.tx_spoofed_mac_count == 1
