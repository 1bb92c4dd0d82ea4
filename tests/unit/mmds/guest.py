"""A fake guest for MMDS tests: builds raw frames, runs a tiny TCP client.

The client is deliberately simple and strict: it checks every checksum of
what the stack sends and keeps its own sequence numbers, so a test fails if
the stack misnumbers a byte.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from asyncvmm.mmds.pdu import (ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_TCP, TCP_ACK, TCP_FIN,
                               TCP_PSH, TCP_RST, TCP_SYN, TcpSegment, build_arp, build_ethernet,
                               build_ipv4, build_tcp, parse_arp, parse_ethernet, parse_ipv4,
                               parse_tcp)
from asyncvmm.mmds.stack import MmdsNetworkStack

GUEST_MAC = bytes.fromhex("aafc00000001")
GUEST_IP = ipaddress.IPv4Address("172.16.0.2").packed
MMDS_IP = ipaddress.IPv4Address("169.254.169.254").packed


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def tcp_frame(seg: TcpSegment, *, src_ip: bytes = GUEST_IP, dst_ip: bytes = MMDS_IP,
              src_mac: bytes = GUEST_MAC, ident: int = 1) -> bytes:
    packet = build_ipv4(src_ip, dst_ip, IPPROTO_TCP, ident, build_tcp(src_ip, dst_ip, seg))
    return build_ethernet(b"\x06\x01\x23\x45\x67\x01", src_mac, ETHERTYPE_IPV4, packet)


def arp_request(target_ip: bytes = MMDS_IP, sender_mac: bytes = GUEST_MAC,
                sender_ip: bytes = GUEST_IP) -> bytes:
    arp = build_arp(1, sender_mac, sender_ip, bytes(6), target_ip)
    return build_ethernet(b"\xff" * 6, sender_mac, ETHERTYPE_ARP, arp)


def decode(frame: bytes) -> tuple[bytes, TcpSegment]:
    """Destination MAC and TCP segment of a frame from the stack (checksums verified)."""
    eth, payload = parse_ethernet(frame)
    assert eth.ethertype == ETHERTYPE_IPV4
    ip, data = parse_ipv4(payload)
    assert ip.protocol == IPPROTO_TCP and ip.src == MMDS_IP
    return eth.dst, parse_tcp(data, ip.src, ip.dst, verify_checksum=True)


def decode_arp(frame: bytes):
    eth, payload = parse_ethernet(frame)
    assert eth.ethertype == ETHERTYPE_ARP
    return eth, parse_arp(payload)


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: str = ""

    @property
    def text(self) -> str:
        return self.body.decode()


def parse_reply(data: bytes) -> tuple[HttpReply, bytes] | None:
    """One complete HTTP response from the front of ``data`` and the rest."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].decode("ascii")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        k, _, v = line.partition(": ")
        headers[k.lower()] = v
    length = int(headers["content-length"])
    if len(data) < end + 4 + length:
        return None
    body = data[end + 4:end + 4 + length]
    return (HttpReply(int(status_line.split(" ")[1]), headers, body, head),
            data[end + 4 + length:])


@dataclass
class GuestConnection:
    """A guest TCP client talking to ``stack`` from ``port``."""

    stack: MmdsNetworkStack
    port: int = 40000
    mss: int | None = 1460
    window: int = 65535
    iss: int = 1000
    seq: int = 0
    ack: int = 0
    received: bytearray = field(default_factory=bytearray)
    fin_received: bool = False
    rst_received: bool = False
    segments: list[TcpSegment] = field(default_factory=list)

    def send(self, flags: int, payload: bytes = b"", *, seq: int | None = None,
             ack: int | None = None, window: int | None = None, mss: int | None = None) -> bool:
        seg = TcpSegment(self.port, 80, self.seq if seq is None else seq,
                         self.ack if ack is None else ack, flags,
                         self.window if window is None else window, mss, payload)
        return self.stack.handle_guest_frame(tcp_frame(seg))

    def pump(self, max_frames: int | None = None, *, auto_ack: bool = True) -> list[TcpSegment]:
        """Collect the stack's frames for us; take in-order data; ACK it."""
        got = []
        for frame in self.stack.pop_frames_for_guest(max_frames):
            mac, seg = decode(frame)
            assert mac == GUEST_MAC
            if seg.dst_port != self.port:
                continue
            got.append(seg)
            self.segments.append(seg)
            if seg.has(TCP_RST):
                self.rst_received = True
                continue
            if seg.seq == self.ack and (seg.payload or seg.has(TCP_FIN)):
                self.received += seg.payload
                self.ack = (self.ack + len(seg.payload) + seg.has(TCP_FIN)) & 0xFFFFFFFF
                self.fin_received |= seg.has(TCP_FIN)
        if auto_ack and any(s.payload or s.has(TCP_FIN) for s in got):
            self.send(TCP_ACK)
        return got

    def connect(self) -> TcpSegment:
        self.seq = self.iss
        assert self.send(TCP_SYN, mss=self.mss)
        synack = [s for s in self.pump() if s.has(TCP_SYN)]
        assert len(synack) == 1 and synack[0].has(TCP_ACK)
        assert synack[0].ack == self.iss + 1
        self.seq = self.iss + 1
        self.ack = (synack[0].seq + 1) & 0xFFFFFFFF
        self.send(TCP_ACK)
        return synack[0]

    def send_data(self, data: bytes) -> None:
        self.send(TCP_ACK | TCP_PSH, data)
        self.seq = (self.seq + len(data)) & 0xFFFFFFFF

    def request(self, raw: bytes, *, rounds: int = 200) -> HttpReply:
        self.send_data(raw)
        for _ in range(rounds):
            parsed = parse_reply(bytes(self.received))
            if parsed is not None:
                reply, rest = parsed
                self.received = bytearray(rest)
                return reply
            if not self.pump() and not self.stack.has_pending():
                break
        raise AssertionError(f"no complete response; got {bytes(self.received)!r}")

    def get(self, path: str, **headers: str) -> HttpReply:
        return self.request(http_request("GET", path, **headers))

    def put(self, path: str, **headers: str) -> HttpReply:
        return self.request(http_request("PUT", path, **headers))


def http_request(method: str, path: str, version: str = "HTTP/1.1", **headers: str) -> bytes:
    lines = [f"{method} {path} {version}", "Host: 169.254.169.254"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
