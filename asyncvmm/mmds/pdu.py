"""Ethernet II, ARP, IPv4 and TCP headers: parse (validating) and build.

Primer.  An Ethernet II frame is ``dst MAC (6) | src MAC (6) | EtherType (2) |
payload``.  ARP for IPv4 over Ethernet (RFC 826) is 28 bytes: hardware type 1,
protocol type 0x0800, lengths 6 and 4, an operation (1 request, 2 reply) and
sender/target hardware and protocol addresses.  An IPv4 header (RFC 791) is
20 bytes plus options (``IHL`` counts 32-bit words); ``total length`` covers
header and payload, so Ethernet padding after it is ignored; the header
checksum is the ones' complement sum of the header (RFC 1071).  A TCP header
(RFC 9293) is 20 bytes plus options (``data offset`` in words); its checksum
covers a pseudo-header (source, destination, protocol, TCP length) and the
whole segment.

Parsers take untrusted bytes and either return header objects or raise
:class:`MalformedPacketError`; they never index out of range.  Builders
compute every checksum, so frames handed to the guest need no offload.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass

ETH_ALEN = 6
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806

ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARP_LEN = 28

IPV4_MIN_HLEN = 20
IPPROTO_TCP = 6
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF

TCP_MIN_HLEN = 20
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MAXSEG = 2

# Offsets from the start of an Ethernet frame, for the cheap "is this for
# the MMDS?" peek that must not parse the whole frame.
ARP_TPA_OFFSET = ETH_HLEN + 24
IPV4_DST_OFFSET = ETH_HLEN + 16

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_PSEUDO = struct.Struct("!4s4sBBH")


class MalformedPacketError(Exception):
    pass


def internet_checksum(*chunks: bytes | memoryview) -> int:
    """RFC 1071 checksum of the concatenated chunks (each but the last even-sized)."""
    data = b"".join(chunks)
    if len(data) % 2:
        data += b"\0"
    # The ones' complement sum is byte-order independent (RFC 1071 section
    # 2(B)), so summing native-order words and swapping once at the end is
    # right on either endianness.
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if sys.byteorder == "little":
        total = ((total & 0xFF) << 8) | (total >> 8)
    return ~total & 0xFFFF


def is_unicast_mac(mac: bytes) -> bool:
    return len(mac) == ETH_ALEN and not mac[0] & 1 and mac != bytes(ETH_ALEN)


# -- Ethernet --------------------------------------------------------------

@dataclass(frozen=True)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: bytes) -> tuple[EthernetHeader, bytes]:
    if len(frame) < ETH_HLEN:
        raise MalformedPacketError("frame shorter than an Ethernet header")
    dst, src, ethertype = _ETH.unpack_from(frame)
    return EthernetHeader(dst, src, ethertype), frame[ETH_HLEN:]


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, ethertype) + payload


# -- ARP -------------------------------------------------------------------

@dataclass(frozen=True)
class ArpPacket:
    oper: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(payload: bytes) -> ArpPacket:
    if len(payload) < ARP_LEN:
        raise MalformedPacketError("truncated ARP packet")
    htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETHERTYPE_IPV4, ETH_ALEN, 4):
        raise MalformedPacketError("ARP packet is not IPv4 over Ethernet")
    return ArpPacket(oper, sha, spa, tha, tpa)


def build_arp(oper: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return _ARP.pack(ARPHRD_ETHER, ETHERTYPE_IPV4, ETH_ALEN, 4, oper, sha, spa, tha, tpa)


# -- IPv4 ------------------------------------------------------------------

@dataclass(frozen=True)
class Ipv4Header:
    src: bytes
    dst: bytes
    protocol: int
    ident: int
    flags_fragment: int
    ttl: int

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_fragment & (IP_MF | IP_OFFMASK))


def parse_ipv4(packet: bytes) -> tuple[Ipv4Header, bytes]:
    """Validate an IPv4 header (checksum included); returns it and the payload."""
    if len(packet) < IPV4_MIN_HLEN:
        raise MalformedPacketError("truncated IPv4 header")
    ver_ihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    hlen = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or hlen < IPV4_MIN_HLEN:
        raise MalformedPacketError("not an IPv4 header")
    if not hlen <= total <= len(packet):
        raise MalformedPacketError(f"IPv4 total length {total} out of bounds")
    if internet_checksum(packet[:hlen]) != 0:
        raise MalformedPacketError("bad IPv4 header checksum")
    return Ipv4Header(src, dst, proto, ident, frag, ttl), packet[hlen:total]


def build_ipv4(src: bytes, dst: bytes, protocol: int, ident: int, payload: bytes,
               ttl: int = 64) -> bytes:
    total = IPV4_MIN_HLEN + len(payload)
    header = _IPV4.pack(0x45, 0, total, ident & 0xFFFF, IP_DF, ttl, protocol, 0, src, dst)
    csum = internet_checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + payload


# -- TCP -------------------------------------------------------------------

@dataclass(frozen=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None = None
    payload: bytes = b""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus SYN and FIN."""
        return len(self.payload) + self.has(TCP_SYN) + self.has(TCP_FIN)


def _tcp_pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    return _PSEUDO.pack(src, dst, 0, IPPROTO_TCP, length)


def _parse_mss(options: bytes) -> int | None:
    mss = None
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise MalformedPacketError("malformed TCP option")
        length = options[i + 1]
        if kind == TCPOPT_MAXSEG:
            if length != 4:
                raise MalformedPacketError("malformed TCP MSS option")
            mss = int.from_bytes(options[i + 2:i + 4], "big")
        i += length
    return mss


def parse_tcp(segment: bytes, src_ip: bytes, dst_ip: bytes, *, verify_checksum: bool) -> TcpSegment:
    """Validate a TCP segment carried between ``src_ip`` and ``dst_ip``.

    ``verify_checksum`` is False when the guest offloaded the checksum to
    the device (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field then holds only the
    pseudo-header sum.
    """
    if len(segment) < TCP_MIN_HLEN:
        raise MalformedPacketError("truncated TCP header")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _TCP.unpack_from(segment)
    hlen = (off >> 4) * 4
    if not TCP_MIN_HLEN <= hlen <= len(segment):
        raise MalformedPacketError("bad TCP data offset")
    if verify_checksum and internet_checksum(_tcp_pseudo(src_ip, dst_ip, len(segment)), segment) != 0:
        raise MalformedPacketError("bad TCP checksum")
    mss = _parse_mss(segment[TCP_MIN_HLEN:hlen])
    return TcpSegment(sport, dport, seq, ack, flags, window, mss, bytes(segment[hlen:]))


def build_tcp(src_ip: bytes, dst_ip: bytes, seg: TcpSegment) -> bytes:
    options = b"" if seg.mss is None else struct.pack("!BBH", TCPOPT_MAXSEG, 4, seg.mss)
    hlen = TCP_MIN_HLEN + len(options)
    header = _TCP.pack(seg.src_port, seg.dst_port, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                       (hlen // 4) << 4, seg.flags, seg.window, 0, 0) + options
    length = hlen + len(seg.payload)
    csum = internet_checksum(_tcp_pseudo(src_ip, dst_ip, length), header, seg.payload)
    return header[:16] + csum.to_bytes(2, "big") + header[18:] + seg.payload
