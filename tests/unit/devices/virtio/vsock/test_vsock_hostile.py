"""A guest that breaks the vsock protocol or lays out bad chains costs itself packets, never the VMM."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET, VIRTQ_DESC_F_NEXT
from asyncvmm.devices.virtio.vsock.packet import (
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)
from tests.fakes.virtio_driver import Buf
from tests.unit.devices.virtio.vsock.helpers import GUEST_CID


def hdr(op=VIRTIO_VSOCK_OP_REQUEST, *, src_cid=GUEST_CID, dst_cid=VMADDR_CID_HOST, sport=1024, dport=70,
        length=0, type_=VIRTIO_VSOCK_TYPE_STREAM) -> Header:
    return Header(src_cid, dst_cid, sport, dport, length, type_, op, 0, 4096, 0)


async def still_works(vr) -> None:
    """A good REQUEST to a listening port still gets its RESPONSE."""
    if not any(s.getsockname().endswith("_99") for s in vr.listeners):
        vr.listen(99)
    vr.guest.send(VIRTIO_VSOCK_OP_REQUEST, 4321, 99)
    for _ in range(10):
        h, _ = await vr.guest.recv()
        if h.op == VIRTIO_VSOCK_OP_RESPONSE and h.dst_port == 4321:
            break
    else:
        raise AssertionError("no RESPONSE after the hostile packets")
    assert not vr.rig.driver.status & DEVICE_NEEDS_RESET


def put_chain(vr, bufs: list[Buf]) -> int:
    txq = vr.guest.txq
    head = txq.add_chain(bufs)
    txq.offer(head)
    vr.rig.driver.kick(txq)
    return head


async def test_unusable_tx_chains_are_answered_and_counted(vsock):
    mem, alloc, txq = vsock.rig.mem, vsock.rig.alloc, vsock.guest.txq
    a = alloc.alloc(HDR_SIZE + 128)
    good = hdr(VIRTIO_VSOCK_OP_RW, length=100).pack()
    mem.write(a, good)
    heads = [
        put_chain(vsock, [Buf(a, HDR_SIZE - 1)]),                                  # short header
        put_chain(vsock, [Buf(a, HDR_SIZE + 128, True)]),                          # writable
        put_chain(vsock, [Buf(a, HDR_SIZE + 10)]),                                 # len beyond the chain
        put_chain(vsock, [Buf(mem.end - 8, HDR_SIZE)]),                            # outside RAM
        put_chain(vsock, [Buf(a, HDR_SIZE), Buf(a, 8, True), Buf(a, 8)]),          # readable after writable
    ]
    big = alloc.alloc(HDR_SIZE)
    mem.write(big, hdr(VIRTIO_VSOCK_OP_RW, length=MAX_PKT_PAYLOAD + 1).pack())
    heads.append(put_chain(vsock, [Buf(big, HDR_SIZE), Buf(0x100000, MAX_PKT_PAYLOAD + 1)]))  # too big
    used = await vsock.rig.driver.wait_used(txq, len(heads))
    assert sorted(used) == sorted((h, 0) for h in heads)
    for head, _ in used:
        vsock.guest.tx_slot.pop(head, None)
    assert vsock.dev.metrics.tx_queue_event_fails == len(heads)
    await still_works(vsock)


async def test_descriptor_loop_on_tx_is_a_dropped_packet(vsock):
    txq = vsock.guest.txq
    a = vsock.rig.alloc.alloc(HDR_SIZE)
    vsock.rig.mem.write(a, hdr().pack())
    i, j = txq.free.pop(0), txq.free.pop(0)
    txq.write_desc(i, a, 8, VIRTQ_DESC_F_NEXT, j)
    txq.write_desc(j, a, 8, VIRTQ_DESC_F_NEXT, i)
    txq.offer(i)
    vsock.rig.driver.kick(txq)
    assert await vsock.rig.driver.wait_used(txq, 1) == [(i, 0)]
    await still_works(vsock)


async def test_misaddressed_packets_are_dropped(vsock):
    vsock.listen(70)
    vsock.guest.send_raw(hdr(src_cid=GUEST_CID + 1))             # spoofed source CID
    vsock.guest.send_raw(hdr(dst_cid=GUEST_CID))                 # not for the host
    assert await vsock.guest.quiet() == []
    assert not vsock.dev.muxer.conns
    assert vsock.dev.metrics.tx_queue_event_fails == 2
    await still_works(vsock)


async def test_unknown_type_and_stray_packets_get_rst(vsock):
    vsock.guest.send_raw(hdr(type_=2))                           # SEQPACKET is not offered
    vsock.guest.send_raw(hdr(VIRTIO_VSOCK_OP_RW, dport=71, length=0))   # no such connection
    vsock.guest.send_raw(hdr(VIRTIO_VSOCK_OP_RST, dport=72))     # RST for nothing: silence
    ops = [(h.op, h.src_port) for h, _ in await vsock.guest.quiet()]
    assert ops == [(VIRTIO_VSOCK_OP_RST, 70), (VIRTIO_VSOCK_OP_RST, 71)]


async def test_unusable_rx_chains_are_answered_and_counted(tmp_path):
    from asyncvmm.devices.virtio.vsock import Vsock
    from tests.unit.devices.virtio.conftest import make_rig
    from tests.unit.devices.virtio.vsock.helpers import Guest

    dev = Vsock(GUEST_CID, str(tmp_path / "v.sock"), asyncio.get_running_loop())
    rig = make_rig(dev)
    try:
        rxq, txq, evq = await rig.driver.init()
        guest = Guest(rig, rxq, txq, evq, rx_count=0)
        readable = rxq.add_chain([Buf(rig.alloc.alloc(4096), 4096)])
        tiny = rxq.add_chain([Buf(rig.alloc.alloc(64), HDR_SIZE - 1, True)])
        good_addr = rig.alloc.alloc(4096)
        good = rxq.add_chain([Buf(good_addr, 4096, True)])
        for head in (readable, tiny, good):
            rxq.offer(head)
        guest.send_raw(hdr(VIRTIO_VSOCK_OP_RW, dport=2000))      # earns an RST
        used = await rig.driver.wait_used(rxq, 3)
        assert used == [(readable, 0), (tiny, 0), (good, HDR_SIZE)]
        assert Header.unpack(rig.mem.read(good_addr, HDR_SIZE)).op == VIRTIO_VSOCK_OP_RST
        assert dev.metrics.rx_queue_event_fails == 2
        assert not rig.driver.status & DEVICE_NEEDS_RESET
    finally:
        dev.close()
        rig.close()


async def test_an_rx_buffer_with_room_for_the_header_only_takes_control_packets(tmp_path):
    """Data waits for a bigger buffer; the pump does not spin on the small one."""
    from asyncvmm.devices.virtio.vsock import Vsock
    from tests.unit.devices.virtio.conftest import make_rig
    from tests.unit.devices.virtio.vsock.helpers import Guest

    dev = Vsock(GUEST_CID, str(tmp_path / "v.sock"), asyncio.get_running_loop())
    rig = make_rig(dev)
    try:
        rxq, txq, evq = await rig.driver.init()
        guest = Guest(rig, rxq, txq, evq, rx_count=0)
        a = rig.alloc.alloc(HDR_SIZE)
        head = rxq.add_chain([Buf(a, HDR_SIZE, True)])
        rxq.offer(head)
        import socket
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(tmp_path / "v.sock") + "_5")
        srv.listen(1)
        guest.send(VIRTIO_VSOCK_OP_REQUEST, 1024, 5)
        assert await rig.driver.wait_used(rxq, 1) == [(head, HDR_SIZE)]
        host, _ = srv.accept()
        host.sendall(b"data")
        head = rxq.add_chain([Buf(a, HDR_SIZE, True)])
        rxq.offer(head)
        rig.driver.kick(rxq)
        pumps = 0
        real_pump = dev.handler._pump_rx

        def counting_pump():
            nonlocal pumps
            pumps += 1
            real_pump()
        dev.handler._pump_rx = counting_pump
        await asyncio.sleep(0.1)
        assert rxq.take_used() == []                               # no room for data: it waits
        assert pumps <= 2                                          # ... without spinning
        big = rig.alloc.alloc(4096)
        head2 = rxq.add_chain([Buf(big, 4096, True)])
        rxq.offer(head2)
        guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 1024, 5)         # a control packet fits the small one
        used = await rig.driver.wait_used(rxq, 2)
        assert used == [(head, HDR_SIZE), (head2, HDR_SIZE + 4)]
        assert rig.mem.read(big + HDR_SIZE, 4) == b"data"
        host.close()
        srv.close()
    finally:
        dev.close()
        rig.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=HDR_SIZE, max_size=HDR_SIZE + 64))
async def test_random_headers_never_break_the_device(vsock, raw):
    vsock.guest.send_raw(Header.unpack(raw[:HDR_SIZE]), raw[HDR_SIZE:])
    await asyncio.sleep(0.002)
    vsock.guest.poll()
    vsock.guest.received.clear()
    assert not vsock.rig.driver.status & DEVICE_NEEDS_RESET
    assert len(vsock.dev.muxer.rsts) <= 256


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, HDR_SIZE + 99), max_size=6, unique=True), indirect=st.booleans())
async def test_a_packet_split_anywhere_over_descriptors_is_the_same_packet(vsock, cuts, indirect):
    """§2.6.4: the device may not assume how a message is laid out over descriptors."""
    if not vsock.listeners:
        vsock.listen(80)
    srv = vsock.listeners[0]
    port = int(srv.getsockname().rsplit("_", 1)[1])
    sport = 3000 + vsock.dev.metrics.conns_added          # a fresh guest port per example
    vsock.guest.send(VIRTIO_VSOCK_OP_REQUEST, sport, port)
    while True:
        h, _ = await vsock.guest.recv()
        if h.op == VIRTIO_VSOCK_OP_RESPONSE and h.dst_port == sport:
            break
    host, _ = await asyncio.get_running_loop().sock_accept(srv)
    payload = bytes((i * 7 + 1) & 0xFF for i in range(100))
    raw = hdr(VIRTIO_VSOCK_OP_RW, sport=sport, dport=port, length=len(payload)).pack() + payload
    base = vsock.rig.alloc.alloc(len(raw) + 16)
    vsock.rig.mem.write(base, raw)
    edges = [0, *sorted(cuts), len(raw)]
    bufs = [Buf(base + a, b - a) for a, b in zip(edges, edges[1:])]
    txq = vsock.guest.txq
    head = txq.add_indirect_chain(bufs) if indirect else txq.add_chain(bufs)
    txq.offer(head)
    vsock.rig.driver.kick(txq)
    got = b""
    host.setblocking(False)
    while len(got) < len(payload):
        got += await asyncio.wait_for(asyncio.get_running_loop().sock_recv(host, 200), 5)
    assert got == payload
    vsock.guest.send(VIRTIO_VSOCK_OP_RST, sport, port)
    host.close()
