"""The MMDS network stack one guest network interface talks to (sans-I/O).

The virtio-net device, for an interface listed in ``PUT /mmds/config``, shows
every frame the guest transmits to :meth:`MmdsNetworkStack.handle_guest_frame`
*before* it would go to the tap:

* an ARP packet whose target protocol address is the MMDS address, or an IPv4
  packet whose destination is the MMDS address, is the stack's: the call
  returns True and the frame must not reach the tap, even when it turns out
  malformed (it is dropped and counted);
* anything else returns False and the device sends it to the tap as usual.

Frames the stack wants to give the guest wait in the stack until the device
collects them with :meth:`pop_frames_for_guest` (when it has receive
buffers; ``max_frames`` caps one batch).  :meth:`has_pending` says whether a
pop would return something now.  Retransmission is timer-driven:
:meth:`next_deadline` is the earliest clock time at which a frame becomes due
even without guest input, so the driver arms a loop timer for it and, when it
fires, checks :meth:`has_pending`.  Frames are complete Ethernet frames with
correct IPv4 and TCP checksums (no virtio_net_hdr, no offload), at most
``14 + 20 + 20 + mss`` bytes.

Driver sketch (the device's event handler)::

    consumed = mmds.handle_guest_frame(frame, csum_offloaded=needs_csum)
    ...
    if mmds.has_pending(): deliver(mmds.pop_frames_for_guest(free_rx_buffers))
    deadline = mmds.next_deadline()   # -> loop.call_at(deadline, kick_rx)

Bounds: ``max_connections`` (30) connections, a connection with no guest
segment for ``eviction_idle`` seconds is reset when a new one needs its slot;
at most ``max_pending_resets`` (100) queued RSTs and 16 queued ARP replies.
ARP teaches the stack nothing: replies go to the requester's own addresses
and TCP replies to the frame's source, so no cache can be poisoned.
TCP to the MMDS on any port but ``tcp_port`` (80) is answered with RST.

No I/O; the clock is injected.  Not thread-safe: one device drives a stack.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import secrets
import time
from typing import Callable

from asyncvmm.mmds.metrics import MmdsMetrics
from asyncvmm.mmds.pdu import (ARP_TPA_OFFSET, ARPOP_REPLY, ARPOP_REQUEST, ETH_HLEN,
                               ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_TCP, IPV4_DST_OFFSET,
                               TCP_ACK, TCP_RST, TCP_SYN, MalformedPacketError,
                               TcpSegment, build_arp, build_ethernet, build_ipv4, build_tcp,
                               is_unicast_mac, parse_arp, parse_ethernet, parse_ipv4, parse_tcp)
from asyncvmm.mmds.tcp import RequestHandler, TcpConfig, TcpConnection, seq_add

log = logging.getLogger(__name__)

DEFAULT_MMDS_IPV4 = "169.254.169.254"
DEFAULT_MMDS_MAC = "06:01:23:45:67:01"  # Firecracker's MMDS MAC
DEFAULT_TCP_PORT = 80
DEFAULT_MAX_CONNECTIONS = 30
DEFAULT_MAX_PENDING_RESETS = 100
DEFAULT_EVICTION_IDLE = 10.0
MAX_PENDING_ARP_REPLIES = 16

# (remote IPv4, remote port): the local address and port are the stack's.
ConnKey = tuple[bytes, int]


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


class MmdsNetworkStack:
    """ARP + IPv4 + TCP + HTTP for the MMDS address on one interface."""

    def __init__(self, handler: RequestHandler, *, ipv4_addr: str = DEFAULT_MMDS_IPV4,
                 mac: str = DEFAULT_MMDS_MAC, clock: Callable[[], float] = time.monotonic,
                 metrics: MmdsMetrics | None = None, tcp_port: int = DEFAULT_TCP_PORT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_resets: int = DEFAULT_MAX_PENDING_RESETS,
                 eviction_idle: float = DEFAULT_EVICTION_IDLE,
                 tcp_config: TcpConfig = TcpConfig()) -> None:
        self.handler = handler
        self.ipv4 = ipaddress.IPv4Address(ipv4_addr).packed
        self.mac = parse_mac(mac)
        self.clock = clock
        self.metrics = metrics if metrics is not None else MmdsMetrics()
        self.tcp_port = tcp_port
        self.max_connections = max_connections
        self.eviction_idle = eviction_idle
        self.tcp_config = tcp_config
        self._conns: dict[ConnKey, TcpConnection] = {}
        self._conn_macs: dict[ConnKey, bytes] = {}
        self._arp_replies: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._resets: collections.deque[tuple[bytes, bytes, TcpSegment]] = collections.deque()
        self.max_pending_resets = max_pending_resets
        self._ip_ident = 0

    # -- guest -> stack -----------------------------------------------------

    def is_mmds_frame(self, frame: bytes) -> bool:
        """Whether ``frame`` is addressed to the MMDS (a cheap peek, no parsing)."""
        if len(frame) < ETH_HLEN:
            return False
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == ETHERTYPE_ARP:
            return frame[ARP_TPA_OFFSET:ARP_TPA_OFFSET + 4] == self.ipv4
        if ethertype == ETHERTYPE_IPV4:
            return frame[IPV4_DST_OFFSET:IPV4_DST_OFFSET + 4] == self.ipv4
        return False

    def handle_guest_frame(self, frame: bytes | bytearray | memoryview, *,
                           csum_offloaded: bool = False) -> bool:
        """Take ``frame`` if it is the MMDS's; True means "do not send it to the tap".

        ``csum_offloaded``: the guest left the TCP checksum to the device
        (VIRTIO_NET_HDR_F_NEEDS_CSUM), so it is not verified.
        """
        frame = bytes(frame)
        if len(frame) < ETH_HLEN:
            self.metrics.rx_bad_eth += 1
            return False
        if not self.is_mmds_frame(frame):
            return False
        self.metrics.rx_accepted += 1
        try:
            eth, payload = parse_ethernet(frame)
            if eth.ethertype == ETHERTYPE_ARP:
                self._on_arp(payload)
            else:
                self._on_ipv4(eth.src, payload, csum_offloaded)
        except MalformedPacketError as err:
            self.metrics.rx_accepted_err += 1
            log.debug("MMDS dropped a malformed frame: %s", err)
        except Exception:
            # This is where guest bytes enter; a bug below must cost the
            # frame, not the VMM.
            self.metrics.rx_accepted_err += 1
            log.exception("MMDS failed on a guest frame; dropped")
        return True

    def _on_arp(self, payload: bytes) -> None:
        arp = parse_arp(payload)
        if arp.oper != ARPOP_REQUEST or not is_unicast_mac(arp.sha):
            raise MalformedPacketError("not an ARP request from a unicast address")
        reply = (arp.sha, arp.spa)
        if reply in self._arp_replies:
            return
        if len(self._arp_replies) < MAX_PENDING_ARP_REPLIES:
            self._arp_replies.append(reply)
        else:
            self.metrics.tx_errors += 1  # a reply we owe but have no room for

    def _on_ipv4(self, src_mac: bytes, packet: bytes, csum_offloaded: bool) -> None:
        ip, payload = parse_ipv4(packet)
        if ip.is_fragment:
            raise MalformedPacketError("IPv4 fragment")  # nothing of ours is ever that big
        if ip.protocol != IPPROTO_TCP:
            self.metrics.rx_accepted_unusual += 1
            return
        if not is_unicast_mac(src_mac):
            raise MalformedPacketError("TCP from a non-unicast MAC")
        seg = parse_tcp(payload, ip.src, ip.dst, verify_checksum=not csum_offloaded)
        self.metrics.rx_count += 1
        key = (ip.src, seg.src_port)
        conn = self._conns.get(key) if seg.dst_port == self.tcp_port else None
        if conn is not None:
            self._conn_macs[key] = src_mac
            conn.on_segment(seg, self.clock())
            self._reap(key, conn)
        elif seg.dst_port == self.tcp_port and seg.flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_SYN:
            self._accept(key, src_mac, ip.src, seg)
        else:
            self._queue_reset(src_mac, ip.src, seg)

    def _accept(self, key: ConnKey, src_mac: bytes, src_ip: bytes, syn: TcpSegment) -> None:
        now = self.clock()
        if len(self._conns) >= self.max_connections:
            victim = next((k for k, c in self._conns.items()
                           if now - c.last_rx > self.eviction_idle), None)
            if victim is None:
                self._queue_reset(src_mac, src_ip, syn)
                return
            self._push_reset(self._conn_macs[victim], victim[0], self._conns[victim].rst_segment())
            self._forget(victim)
        self._conns[key] = TcpConnection(syn, secrets.randbits(32), now, self.handler,
                                         self.tcp_config)
        self._conn_macs[key] = src_mac
        self.metrics.connections_created += 1

    def _queue_reset(self, mac: bytes, ip: bytes, seg: TcpSegment) -> None:
        """RFC 9293 section 3.10.7.1: answer a segment no connection wants."""
        if seg.flags & TCP_RST:
            return
        if seg.flags & TCP_ACK:
            rst = TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, TCP_RST, 0)
        else:
            rst = TcpSegment(seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len),
                             TCP_RST | TCP_ACK, 0)
        self._push_reset(mac, ip, rst)

    def _push_reset(self, mac: bytes, ip: bytes, rst: TcpSegment) -> None:
        if len(self._resets) < self.max_pending_resets:
            self._resets.append((mac, ip, rst))
        else:
            self.metrics.tx_errors += 1  # a RST we owe but have no room for

    def _forget(self, key: ConnKey) -> None:
        del self._conns[key]
        del self._conn_macs[key]
        self.metrics.connections_destroyed += 1

    def _reap(self, key: ConnKey, conn: TcpConnection) -> None:
        if conn.reset_needed:
            self._push_reset(self._conn_macs[key], key[0], conn.rst_segment())
            conn.reset_needed = False
        if conn.done:
            self._forget(key)

    # -- stack -> guest -----------------------------------------------------

    def has_pending(self) -> bool:
        if self._arp_replies or self._resets:
            return True
        now = self.clock()
        return any(c.has_output(now) or c.reset_needed for c in self._conns.values())

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self._conns.values() if c.deadline is not None]
        return min(deadlines, default=None)

    def _frame_to(self, mac: bytes, ip: bytes, seg: TcpSegment) -> bytes:
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        packet = build_ipv4(self.ipv4, ip, IPPROTO_TCP, self._ip_ident,
                            build_tcp(self.ipv4, ip, seg))
        return build_ethernet(mac, self.mac, ETHERTYPE_IPV4, packet)

    def pop_frames_for_guest(self, max_frames: int | None = None) -> list[bytes]:
        """Frames due now, oldest duty first; at most ``max_frames``."""
        budget = max_frames if max_frames is not None else 1 << 30
        frames: list[bytes] = []
        while self._arp_replies and len(frames) < budget:
            mac, ip = self._arp_replies.popleft()
            arp = build_arp(ARPOP_REPLY, self.mac, self.ipv4, mac, ip)
            frames.append(build_ethernet(mac, self.mac, ETHERTYPE_ARP, arp))
        while self._resets and len(frames) < budget:
            frames.append(self._frame_to(*self._resets.popleft()))
        now = self.clock()
        for key, conn in list(self._conns.items()):
            served = False
            while len(frames) < budget and (seg := conn.next_segment(now)) is not None:
                frames.append(self._frame_to(self._conn_macs[key], key[0], seg))
                served = True
            self._reap(key, conn)
            if served and key in self._conns:
                self._conns[key] = self._conns.pop(key)  # to the back: round robin
                self._conn_macs[key] = self._conn_macs.pop(key)
        if len(frames) < budget:
            while self._resets and len(frames) < budget:
                frames.append(self._frame_to(*self._resets.popleft()))
        self.metrics.tx_frames += len(frames)
        self.metrics.tx_count += len(frames)
        self.metrics.tx_bytes += sum(len(f) for f in frames)
        return frames
