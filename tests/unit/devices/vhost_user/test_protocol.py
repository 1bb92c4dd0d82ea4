"""vhost-user message encoding and answer checks, byte by byte (vhost-user.rst layouts)."""

from __future__ import annotations

import pytest

from asyncvmm.devices.vhost_user import protocol as p
from asyncvmm.devices.vhost_user.protocol import ProtocolError, Request


def test_request_numbers_are_the_specs():
    assert [Request.VHOST_USER_GET_FEATURES, Request.VHOST_USER_SET_FEATURES, Request.VHOST_USER_SET_OWNER,
            Request.VHOST_USER_SET_MEM_TABLE, Request.VHOST_USER_SET_VRING_NUM,
            Request.VHOST_USER_SET_VRING_ADDR, Request.VHOST_USER_SET_VRING_BASE,
            Request.VHOST_USER_GET_VRING_BASE, Request.VHOST_USER_SET_VRING_KICK,
            Request.VHOST_USER_SET_VRING_CALL, Request.VHOST_USER_SET_VRING_ERR,
            Request.VHOST_USER_GET_PROTOCOL_FEATURES, Request.VHOST_USER_SET_PROTOCOL_FEATURES,
            Request.VHOST_USER_GET_QUEUE_NUM, Request.VHOST_USER_SET_VRING_ENABLE,
            Request.VHOST_USER_GET_CONFIG, Request.VHOST_USER_SET_CONFIG] == \
        [1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25]


def test_a_message_without_payload_is_its_header():
    assert p.message(Request.VHOST_USER_SET_OWNER) == bytes.fromhex("03000000" "01000000" "00000000")


def test_need_reply_sets_bit_3_beside_the_version():
    data = p.message(Request.VHOST_USER_SET_FEATURES, p.u64(0x1_0000_0001), need_reply=True)
    assert data == bytes.fromhex("02000000" "09000000" "08000000" "0100000001000000")


def test_vring_state_and_address_layouts():
    assert p.vring_state(1, 256) == bytes.fromhex("01000000" "00010000")
    addr = p.VringAddr(index=0, flags=0, descriptor=0x7F00_0000_1000, used=0x7F00_0000_3000,
                       available=0x7F00_0000_2000, log=0)
    assert p.vring_addr(addr) == (bytes(4) + bytes(4) + (0x7F00_0000_1000).to_bytes(8, "little")
                                  + (0x7F00_0000_3000).to_bytes(8, "little")
                                  + (0x7F00_0000_2000).to_bytes(8, "little") + bytes(8))
    assert len(p.vring_addr(addr)) == 40


def test_vring_fd_payload_carries_the_index_and_the_no_fd_flag():
    assert p.vring_fd(3, has_fd=True) == bytes.fromhex("0300000000000000")
    assert p.vring_fd(3, has_fd=False) == bytes.fromhex("0301000000000000")
    with pytest.raises(ValueError):
        p.vring_fd(256, has_fd=True)


def test_memory_table_is_a_count_padding_and_32_bytes_per_region():
    regions = [p.MemoryRegion(0, 0x8000_0000, 0x7F12_0000_0000, 0),
               p.MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F13_0000_0000, 0x8000_0000)]
    data = p.memory_table(regions)
    assert data[:8] == bytes.fromhex("02000000" "00000000")
    assert len(data) == 8 + 2 * 32
    assert data[8:40] == b"".join(v.to_bytes(8, "little") for v in (0, 0x8000_0000, 0x7F12_0000_0000, 0))
    assert data[40:72] == b"".join(v.to_bytes(8, "little")
                                   for v in (0x1_0000_0000, 0x4000_0000, 0x7F13_0000_0000, 0x8000_0000))
    with pytest.raises(ValueError):
        p.memory_table([])
    with pytest.raises(ValueError):
        p.memory_table(regions * 5)


def test_config_payload():
    assert p.config(0, 4) == bytes.fromhex("00000000" "04000000" "00000000" "00000000")
    assert p.config(8, 2, 1, b"\x01\x02") == bytes.fromhex("08000000" "02000000" "01000000" "0102")
    with pytest.raises(ValueError):
        p.config(0, 4, data=b"\x00")


def test_header_parsing_checks_version_and_size():
    assert p.parse_header(bytes.fromhex("01000000" "05000000" "08000000")) == (1, 5, 8)
    with pytest.raises(ProtocolError, match="version 2"):
        p.parse_header(bytes.fromhex("01000000" "06000000" "08000000"))
    with pytest.raises(ProtocolError, match="version 0"):
        p.parse_header(bytes(12))
    with pytest.raises(ProtocolError, match="payload"):
        p.parse_header(bytes.fromhex("01000000" "05000000" "00000100"))
    with pytest.raises(ProtocolError, match="header"):
        p.parse_header(b"\x01\x00")


def test_an_answer_must_carry_the_reply_flag_and_the_same_request():
    p.check_reply(p.Header(1, 5, 8), Request.VHOST_USER_GET_FEATURES)
    with pytest.raises(ProtocolError, match="reply flag"):
        p.check_reply(p.Header(1, 1, 8), Request.VHOST_USER_GET_FEATURES)
    with pytest.raises(ProtocolError, match="answer to request 15"):
        p.check_reply(p.Header(15, 5, 8), Request.VHOST_USER_GET_FEATURES)


def test_payload_parsers_refuse_wrong_sizes():
    assert p.parse_u64(bytes.fromhex("0100000000000080")) == 0x8000_0000_0000_0001
    with pytest.raises(ProtocolError):
        p.parse_u64(bytes(4))
    assert p.parse_vring_state(bytes.fromhex("00000000" "2a000000")) == (0, 42)
    with pytest.raises(ProtocolError):
        p.parse_vring_state(bytes(12))
    answer = p.config(0, 4, 0, b"abcd")
    assert p.parse_config(answer, 0, 4) == b"abcd"
    with pytest.raises(ProtocolError):
        p.parse_config(answer, 0, 8)
    with pytest.raises(ProtocolError):
        p.parse_config(answer[:10], 0, 4)
