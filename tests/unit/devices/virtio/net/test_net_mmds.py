"""The MMDS behind virtio-net: the guest's frames to 169.254.169.254 are answered, none reach the tap."""

from __future__ import annotations

import asyncio
import json

import pytest

from asyncvmm.devices.virtio.net.header import VIRTIO_NET_HDR, VIRTIO_NET_HDR_F_NEEDS_CSUM
from asyncvmm.mmds import MmdsHttpHandler, MmdsMetrics, MmdsNetworkStack, MmdsStore, TokenAuthority
from asyncvmm.mmds.pdu import (ARPOP_REPLY, IPPROTO_TCP, TCP_ACK, TCP_PSH, TCP_SYN, TcpSegment,
                               build_ethernet, build_ipv4, build_tcp)
from asyncvmm.mmds.tcp import TcpConfig
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.net.conftest import frame, make_net_rig, seq_of
from tests.unit.mmds.guest import (GUEST_IP, GUEST_MAC, MMDS_IP, arp_request, decode, decode_arp,
                                   http_request, parse_reply, tcp_frame)

MMDS_MAC = bytes.fromhex("060123456701")
DATA = {"latest": {"meta-data": {"ami-id": "ami-12345678", "big": "x" * 5000}}}


def make_stack(tcp_config: TcpConfig = TcpConfig()) -> MmdsNetworkStack:
    store = MmdsStore()
    store.put(DATA)
    metrics = MmdsMetrics()
    handler = MmdsHttpHandler(store, TokenAuthority(), metrics=metrics)
    return MmdsNetworkStack(handler, metrics=metrics, tcp_config=tcp_config)


@pytest.fixture
async def net():
    n = await make_net_rig(mmds=make_stack(), guest_mac=GUEST_MAC.hex(":"), post=16)
    yield n
    n.close()


async def test_arp_for_the_mmds_is_answered_and_never_reaches_the_tap(net):
    net.transmit(arp_request())
    [(hdr, reply)] = await net.wait_received(1)
    assert hdr == bytes(10) + b"\x01\x00"                  # no offload flags, num_buffers 1
    eth, arp = decode_arp(reply)
    assert (eth.dst, eth.src, arp.oper, arp.sha, arp.spa, arp.tpa) == (
        GUEST_MAC, MMDS_MAC, ARPOP_REPLY, MMDS_MAC, MMDS_IP, GUEST_IP)
    await settle(10)
    assert net.tap.sent() == []
    m = net.dev.metrics
    assert m.tx_packets_count == 1 and m.tx_count == 0 and m.rx_packets_count == 1
    assert net.dev.mmds.metrics.rx_accepted == 1


async def test_other_frames_still_go_to_the_tap(net):
    net.transmit(arp_request(target_ip=bytes([172, 16, 0, 1])))
    [sent] = await net.wait_sent(1)
    assert sent[12:] == arp_request(target_ip=bytes([172, 16, 0, 1]))
    await settle(10)
    assert net.received() == []


class Client:
    """A TCP client in the 'guest': sends through TX, reads replies from RX."""

    def __init__(self, n, port: int = 40000) -> None:
        self.n, self.port = n, port
        self.seq, self.ack = 1000, 0
        self.data = bytearray()

    def send(self, flags: int, payload: bytes = b"", *, offload: bool = False, mss=None) -> None:
        seg = TcpSegment(self.port, 80, self.seq, self.ack, flags, 65535, mss, payload)
        hdr = bytes(12)
        if offload:
            # Checksum offload: the guest leaves the pseudo-header sum for the device.
            hdr = VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
            tcp = bytearray(build_tcp(GUEST_IP, MMDS_IP, seg))
            tcp[16:18] = b"\x12\x34"                      # not a valid checksum
            packet = build_ipv4(GUEST_IP, MMDS_IP, IPPROTO_TCP, 7, bytes(tcp))
            self.n.transmit(build_ethernet(MMDS_MAC, GUEST_MAC, 0x0800, packet), hdr=hdr)
        else:
            self.n.transmit(tcp_frame(seg), hdr=hdr)
        self.seq = (self.seq + len(payload) + (1 if flags & TCP_SYN else 0)) & 0xFFFFFFFF

    async def segments(self, count: int = 1) -> list[TcpSegment]:
        self.n.post_rx(count)
        return [decode(f)[1] for _, f in await self.n.wait_received(count)]

    async def connect(self, **kw) -> None:
        self.send(TCP_SYN, mss=1460, **kw)
        [synack] = await self.segments()
        assert synack.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        self.ack = (synack.seq + 1) & 0xFFFFFFFF
        self.send(TCP_ACK, **kw)

    async def request(self, raw: bytes, **kw):
        self.send(TCP_ACK | TCP_PSH, raw, **kw)
        for _ in range(50):
            for seg in await self.segments():
                if seg.seq == self.ack and seg.payload:
                    self.data += seg.payload
                    self.ack = (self.ack + len(seg.payload)) & 0xFFFFFFFF
            self.send(TCP_ACK)
            parsed = parse_reply(bytes(self.data))
            if parsed is not None:
                reply, rest = parsed
                self.data = bytearray(rest)
                return reply
        raise AssertionError("no complete response")


@pytest.mark.parametrize("offload", [False, True])
async def test_http_get_through_the_device(net, offload):
    c = Client(net)
    await c.connect(offload=offload)
    reply = await c.request(http_request("GET", "/latest/meta-data/ami-id"), offload=offload)
    assert (reply.status, reply.text) == (200, "ami-12345678")
    reply = await c.request(http_request("GET", "/latest/meta-data", Accept="application/json"))
    assert json.loads(reply.body) == DATA["latest"]["meta-data"]        # several segments
    await settle(10)
    assert net.tap.sent() == []


async def test_mmds_frames_come_before_waiting_tap_frames():
    n = await make_net_rig(mmds=make_stack(), guest_mac=GUEST_MAC.hex(":"))
    n.tap.inject(frame(100, seq=42))
    n.transmit(arp_request())
    await settle(10)
    assert n.received() == []                        # no receive buffers yet
    n.post_rx(2)
    got = await n.wait_received(2)
    decode_arp(got[0][1])                            # the MMDS's ARP reply first
    assert seq_of(got[1][1]) == 42
    n.close()


async def test_unacknowledged_data_is_retransmitted_by_the_loop_timer():
    n = await make_net_rig(mmds=make_stack(TcpConfig(rto_initial=0.01)), guest_mac=GUEST_MAC.hex(":"))
    c = Client(n)
    n.post_rx(8)
    await c.connect()
    c.send(TCP_ACK | TCP_PSH, http_request("GET", "/latest/meta-data/ami-id"))
    first = [decode(f)[1] for _, f in await n.wait_received(1)]
    data = [s for s in first if s.payload]
    # The guest never acknowledges: the same bytes come again, driven by the timer alone.
    for _ in range(500):
        again = [decode(f)[1] for _, f in n.received()]
        if any(s.payload for s in again):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("no retransmission")
    retransmitted = next(s for s in again if s.payload)
    if data:
        assert (retransmitted.seq, retransmitted.payload) == (data[0].seq, data[0].payload)
    assert b"ami-12345678" in retransmitted.payload
    n.close()
