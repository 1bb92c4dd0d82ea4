"""TxPath and RxPath on bytearray guest memory: no tap, no loop, no handler.

These are the net device's decisions as data: a chain goes in, effects and
counters come out (STYLE.md point 2).
"""

from __future__ import annotations

import pytest

from asyncvmm.devices.rate_limiter import RateLimiter, TokenBucket
from asyncvmm.devices.virtio.handler import Used
from asyncvmm.devices.virtio.net.header import NUM_BUFFERS_OFFSET, VNET_HDR_SIZE
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.net.rx import RxPath, RxState
from asyncvmm.devices.virtio.net.tx import Throttled, ToMmds, TxPath, WriteTap
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, Buf, FakeVirtqueue
from tests.unit.devices.virtio.net.conftest import frame

MEM = 4 << 20
GUEST_MAC = bytes.fromhex("aafc00000001")
MMDS_DST = b"\x06\x01\x23\x45\x67\x01"


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def ring():
    mem = GuestMemory.from_buffers([(0, bytearray(MEM))])
    alloc = Allocator(0x1000, MEM)
    vq = FakeVirtqueue(mem, alloc, 0, 16)
    q = Queue(max_size=16, size=16, ready=True, desc_table=vq.desc, avail_ring=vq.avail, used_ring=vq.used)
    q.validate(mem)
    return mem, alloc, vq, q


def offer_tx(mem, alloc, vq, data: bytes) -> int:
    addr = alloc.alloc(len(data))
    mem.write(addr, data)
    head = vq.add_chain([Buf(addr, len(data))])
    vq.offer(head)
    return head


def tx_path(q, limiter=None, mmds=None, mac=GUEST_MAC):
    metrics = NetMetrics()
    return TxPath(q, limiter or RateLimiter(), metrics, is_mmds_frame=mmds, guest_mac=lambda: mac), metrics


# -- transmit -----------------------------------------------------------------

def test_a_frame_becomes_one_tap_write_then_its_used_entry(ring):
    mem, alloc, vq, q = ring
    data = bytes(VNET_HDR_SIZE) + frame(60, src=GUEST_MAC)
    head = offer_tx(mem, alloc, vq, data)
    tx, m = tx_path(q)
    effects = tx.chain(mem, q.pop(mem))
    assert [type(e) for e in effects] == [WriteTap, Used]
    assert effects[1] == Used(head, 0)
    assert b"".join(effects[0].pkt.views) == data            # zero-copy views of guest memory
    assert vq.used_idx == 0                                   # nothing done yet: only decided
    assert m.tx_packets_count == 0                            # counted when it really leaves
    tx.sent(effects[0].pkt, to_tap=True)
    assert (m.tx_count, m.tx_packets_count, m.tx_bytes_count) == (1, 1, 60)


def test_a_malformed_chain_is_answered_and_counted_without_any_io(ring):
    mem, alloc, vq, q = ring
    head = offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE + 5))   # shorter than an Ethernet header
    tx, m = tx_path(q)
    assert tx.chain(mem, q.pop(mem)) == [Used(head, 0)]
    assert (m.tx_malformed_frames, m.tx_fails) == (1, 1)


def test_a_frame_for_the_mmds_goes_to_the_stack_not_the_tap(ring):
    mem, alloc, vq, q = ring
    offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE) + frame(60, dst=MMDS_DST, src=GUEST_MAC))
    offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE) + frame(60, src=GUEST_MAC))
    tx, _ = tx_path(q, mmds=lambda f: f[:6] == MMDS_DST)
    assert [type(e) for e in tx.chain(mem, q.pop(mem))] == [ToMmds, Used]
    assert [type(e) for e in tx.chain(mem, q.pop(mem))] == [WriteTap, Used]


def test_a_spoofed_source_mac_is_counted_but_sent(ring):
    mem, alloc, vq, q = ring
    offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE) + frame(60, src=b"\x02\x00\x00\x00\x00\x66"))
    tx, m = tx_path(q)
    assert [type(e) for e in tx.chain(mem, q.pop(mem))] == [WriteTap, Used]
    assert m.tx_spoofed_mac_count == 1


def test_the_limiter_refuses_with_a_throttled_effect_and_a_full_tap_refunds_the_tokens(ring):
    mem, alloc, vq, q = ring
    clock = Clock()
    limiter = RateLimiter(ops=TokenBucket(1, 1000, clock=clock), clock=clock)
    for _ in range(3):
        offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE) + frame(60, src=GUEST_MAC))
    tx, m = tx_path(q, limiter)
    first = tx.chain(mem, q.pop(mem))
    assert isinstance(first[0], WriteTap) and limiter.ops.budget == 0
    # The tap was full: the chain goes back and so does its op, so it may go again at once.
    tx.would_block(first[0].pkt)
    q.undo_pop()
    assert limiter.ops.budget == 1
    assert isinstance(tx.chain(mem, q.pop(mem))[0], WriteTap)
    assert tx.chain(mem, q.pop(mem)) == [Throttled()]         # now the one op is spent
    q.undo_pop()
    assert m.tx_rate_limiter_throttled == 1
    assert m.tx_remaining_reqs_count == 2                     # this chain and the one behind it
    clock.ns += 1_000_000_000                                 # a refill later it goes
    assert isinstance(tx.chain(mem, q.pop(mem))[0], WriteTap)


def test_a_failed_tap_write_is_counted_as_a_dropped_frame(ring):
    mem, alloc, vq, q = ring
    offer_tx(mem, alloc, vq, bytes(VNET_HDR_SIZE) + frame(60, src=GUEST_MAC))
    tx, m = tx_path(q)
    pkt = tx.chain(mem, q.pop(mem))[0].pkt
    tx.write_failed(pkt)
    assert (m.tap_write_fails, m.tx_fails, m.tx_packets_count) == (1, 1, 0)


# -- receive ------------------------------------------------------------------

def rx_path(q, limiter=None, *, mergeable=False, guest_csum=True, guest_gso=False):
    metrics = NetMetrics()
    return RxPath(q, limiter or RateLimiter(), metrics, mergeable=mergeable, guest_csum=guest_csum,
                  guest_gso=guest_gso), metrics


def offer_rx(alloc, vq, size: int) -> tuple[int, int]:
    addr = alloc.alloc(size)
    head = vq.add_chain([Buf(addr, size, True)])
    vq.offer(head)
    return head, addr


def packet(n: int, flags: int = 0) -> memoryview:
    return memoryview(bytearray(bytes([flags]) + bytes(VNET_HDR_SIZE - 1) + frame(n)))


def test_rx_with_no_buffers_says_so_once_and_turns_notifications_on(ring):
    mem, alloc, vq, q = ring
    rx, m = rx_path(q)
    assert rx.ready(mem, receiving=True) is RxState.NO_BUFFERS
    assert rx.ready(mem, receiving=True) is RxState.NO_BUFFERS
    assert m.no_rx_avail_buffer == 1                          # one wait, counted once
    offer_rx(alloc, vq, 2048)
    assert rx.ready(mem, receiving=True) is RxState.READY


def test_rx_delivers_the_held_frame_into_the_chain_with_num_buffers(ring):
    mem, alloc, vq, q = ring
    head, addr = offer_rx(alloc, vq, 2048)
    rx, m = rx_path(q)
    rx.hold(packet(100))
    assert rx.deliver(mem) is RxState.READY and rx.held is None
    assert vq.take_used() == [(head, VNET_HDR_SIZE + 100)]
    got = mem.read(addr, VNET_HDR_SIZE + 100)
    assert got[NUM_BUFFERS_OFFSET] == 1 and got[VNET_HDR_SIZE:] == frame(100)
    assert (m.rx_packets_count, m.rx_bytes_count) == (1, 100)


def test_rx_holds_the_frame_when_the_limiter_is_empty_and_clears_csum_flags_for_old_drivers(ring):
    mem, alloc, vq, q = ring
    clock = Clock()
    limiter = RateLimiter(ops=TokenBucket(1, 1000, clock=clock), clock=clock)
    offer_rx(alloc, vq, 2048)
    _, addr = offer_rx(alloc, vq, 2048)
    rx, m = rx_path(q, limiter, guest_csum=False)
    rx.hold(packet(60))
    assert rx.deliver(mem) is RxState.READY
    rx.hold(packet(60, flags=1))
    assert rx.deliver(mem) is RxState.THROTTLED and rx.held is not None   # kept, not dropped
    assert m.rx_rate_limiter_throttled == 1
    assert rx.ready(mem, receiving=True) is RxState.THROTTLED
    clock.ns += 1_000_000_000
    assert rx.deliver(mem) is RxState.READY
    assert mem.read(addr, 1) == b"\x00"                       # NEEDS_CSUM cleared (§5.1.6.4)


def test_rx_drops_a_frame_too_large_for_the_buffers_and_a_gso_frame_without_gso(ring):
    mem, alloc, vq, q = ring
    offer_rx(alloc, vq, 64)
    offer_rx(alloc, vq, 2048)
    rx, m = rx_path(q)
    rx.hold(packet(200))
    assert rx.deliver(mem) is RxState.READY and rx.held is None
    gso = packet(60)
    gso[1] = 1                                                # VIRTIO_NET_HDR_GSO_TCPV4
    rx.hold(gso)
    assert rx.deliver(mem) is RxState.READY and rx.held is None
    assert m.rx_fails == 2 and m.rx_packets_count == 0


def test_rx_places_a_frame_that_fits_the_first_buffer_at_once(ring):
    mem, alloc, vq, q = ring
    head, addr = offer_rx(alloc, vq, 2048)
    rx, m = rx_path(q, guest_csum=False)
    assert not rx.can_take()                                  # nothing in the stock yet
    assert rx.ready(mem, receiving=False) is RxState.READY and rx.can_take()
    assert rx.place(mem, packet(100, flags=1)) and rx.held is None
    assert vq.take_used() == [(head, VNET_HDR_SIZE + 100)]
    got = mem.read(addr, VNET_HDR_SIZE + 100)
    assert got[0] == 0                                        # NEEDS_CSUM cleared (§5.1.6.4)
    assert got[NUM_BUFFERS_OFFSET] == 1 and got[VNET_HDR_SIZE:] == frame(100)
    assert (m.rx_packets_count, m.rx_bytes_count) == (1, 100)
    assert not rx.can_take() and not rx.place(mem, packet(100))   # the stock is empty now


def test_rx_place_leaves_every_decision_to_deliver(ring):
    """A limiter, a frame larger than the first buffer, a GSO frame the guest cannot take:
    place() does nothing (flags untouched) and deliver() decides as before."""
    mem, alloc, vq, q = ring
    offer_rx(alloc, vq, 64)
    offer_rx(alloc, vq, 2048)
    rx, m = rx_path(q, guest_csum=False)
    assert rx.ready(mem, receiving=False) is RxState.READY
    big = packet(200, flags=1)
    assert not rx.place(mem, big) and big[0] == 1 and vq.take_used() == []
    gso = packet(60)
    gso[1] = 1                                                # VIRTIO_NET_HDR_GSO_TCPV4
    assert not rx.place(mem, gso) and vq.take_used() == []
    clock = Clock()
    limited, _ = rx_path(q, RateLimiter(ops=TokenBucket(100, 1000, clock=clock), clock=clock))
    offer_rx(alloc, vq, 2048)
    assert limited.ready(mem, receiving=False) is RxState.READY
    assert not limited.can_take() and not limited.place(mem, packet(60))
    assert vq.take_used() == [] and m.rx_packets_count == 0


def test_rx_takes_every_simple_chain_at_once_and_walks_others_only_when_short(ring):
    """One-descriptor chains (what Linux posts) all go into the stock on the first look, so
    the frames after the first are placed without popping; a chain that needs the general
    walk is left in the ring until the stock needs it."""
    mem, alloc, vq, q = ring
    simple = [offer_rx(alloc, vq, 2048) for _ in range(3)]
    addr = alloc.alloc(2048)
    walked = vq.add_chain([Buf(addr, 1024, True), Buf(addr + 1024, 1024, True)])
    vq.offer(walked)
    rx, m = rx_path(q)
    assert rx.ready(mem, receiving=False) is RxState.READY
    assert rx.buffers.held_chains == 3 and q.pending(mem) == 1
    for _ in range(3):
        assert rx.can_take() and rx.place(mem, packet(100))
    assert [head for head, _ in vq.take_used()] == [head for head, _ in simple]
    assert not rx.can_take()
    assert rx.ready(mem, receiving=True) is RxState.READY     # now the walked chain is taken
    assert rx.buffers.held_chains == 1 and q.pending(mem) == 0
    rx.hold(packet(100))
    assert rx.deliver(mem) is RxState.READY
    assert vq.take_used() == [(walked, VNET_HDR_SIZE + 100)]
    assert m.rx_packets_count == 4 and m.rx_fails == 0
