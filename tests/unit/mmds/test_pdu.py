import pytest
from hypothesis import given, strategies as st

from asyncvmm.mmds.pdu import (TCP_ACK, TCP_SYN, MalformedPacketError, TcpSegment, build_ipv4,
                               build_tcp, internet_checksum, parse_arp, parse_ethernet,
                               parse_ipv4, parse_tcp)

A = bytes([192, 168, 0, 1])
B = bytes([192, 168, 0, 199])


def test_checksum_of_a_known_ipv4_header():
    # A textbook header whose checksum field is 0xb861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861
    assert internet_checksum(header[:10] + b"\xb8\x61" + header[12:]) == 0


def test_checksum_of_odd_length_data_pads_with_zero():
    assert internet_checksum(b"\x01") == internet_checksum(b"\x01\x00") == 0xFEFF


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=300))
def test_checksum_matches_a_plain_reference(data):
    assert internet_checksum(data) == reference_checksum(data)


def test_ipv4_round_trip_and_padding_is_ignored():
    packet = build_ipv4(A, B, 6, 7, b"payload")
    ip, payload = parse_ipv4(packet + b"\0" * 10)
    assert (ip.src, ip.dst, ip.protocol, ip.ident, ip.ttl) == (A, B, 6, 7, 64)
    assert payload == b"payload" and not ip.is_fragment


def test_ipv4_with_options_is_parsed():
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    plain = build_ipv4(A, B, 6, 1, b"data")
    header = bytearray(plain[:20] + options)
    header[0] = 0x46
    header[2:4] = (24 + 4).to_bytes(2, "big")
    header[10:12] = b"\0\0"
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    ip, payload = parse_ipv4(bytes(header) + b"data")
    assert payload == b"data"


@pytest.mark.parametrize("mutate", [
    lambda p: p[:19],                                   # truncated
    lambda p: bytes([0x65]) + p[1:],                    # version 6
    lambda p: bytes([0x44]) + p[1:],                    # IHL 4
    lambda p: p[:2] + (5000).to_bytes(2, "big") + p[4:],  # total length beyond data
    lambda p: p[:2] + (10).to_bytes(2, "big") + p[4:],    # total length below header
    lambda p: p[:10] + bytes([p[10] ^ 1]) + p[11:],    # bad checksum
])
def test_bad_ipv4_is_rejected(mutate):
    with pytest.raises(MalformedPacketError):
        parse_ipv4(mutate(build_ipv4(A, B, 6, 1, b"abcd")))


def test_fragments_are_recognised():
    packet = bytearray(build_ipv4(A, B, 6, 1, b"x"))
    packet[6:8] = (0x2000).to_bytes(2, "big")  # MF
    packet[10:12] = b"\0\0"
    packet[10:12] = internet_checksum(bytes(packet[:20])).to_bytes(2, "big")
    ip, _ = parse_ipv4(bytes(packet))
    assert ip.is_fragment


def test_tcp_round_trip_with_mss():
    seg = TcpSegment(1234, 80, 0xFFFFFFFF, 5, TCP_SYN | TCP_ACK, 4096, 1460, b"hello")
    raw = build_tcp(A, B, seg)
    assert parse_tcp(raw, A, B, verify_checksum=True) == seg
    other = bytes([10, 0, 0, 1])
    with pytest.raises(MalformedPacketError):
        parse_tcp(raw, other, B, verify_checksum=True)  # the pseudo-header is checksummed
    assert parse_tcp(raw, other, B, verify_checksum=False) == seg


@pytest.mark.parametrize("options", [b"\x02", b"\x01\x01\x01\x02", b"\x08\x01\x00\x00",
                                     b"\x02\x03\x05\x00", b"\x05\x00\x00\x00"])
def test_malformed_tcp_options_are_rejected(options):
    raw = bytearray(build_tcp(A, B, TcpSegment(1, 80, 0, 0, TCP_ACK, 10)))
    raw = raw[:20] + options + b"\0" * (-len(options) % 4)
    raw[12] = (len(raw) // 4) << 4
    with pytest.raises(MalformedPacketError):
        parse_tcp(bytes(raw), A, B, verify_checksum=False)


def test_bad_data_offset_is_rejected():
    raw = bytearray(build_tcp(A, B, TcpSegment(1, 80, 0, 0, TCP_ACK, 10)))
    raw[12] = 15 << 4
    with pytest.raises(MalformedPacketError):
        parse_tcp(bytes(raw), A, B, verify_checksum=False)


def test_arp_must_be_ipv4_over_ethernet():
    with pytest.raises(MalformedPacketError):
        parse_arp(bytes(27))
    with pytest.raises(MalformedPacketError):
        parse_arp(bytes(28))
    with pytest.raises(MalformedPacketError):
        parse_ethernet(bytes(13))


@given(st.binary(max_size=80))
def test_parsers_raise_only_malformed(data):
    for parse in (lambda d: parse_ipv4(d), lambda d: parse_arp(d), lambda d: parse_ethernet(d),
                  lambda d: parse_tcp(d, A, B, verify_checksum=False),
                  lambda d: parse_tcp(d, A, B, verify_checksum=True)):
        try:
            parse(data)
        except MalformedPacketError:
            pass
