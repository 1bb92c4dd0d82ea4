"""The sans-I/O connection: credit arithmetic with u32 wrap-around, owed packets, and packet parsing."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.devices.virtio.vsock.connection import CONN_BUF_ALLOC, U32, Connection
from asyncvmm.devices.virtio.vsock.packet import (
    HDR_SIZE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_RW,
    Header,
)


@pytest.fixture
def conn():
    a, b = socket.socketpair()
    yield Connection(3, 52, 1024, a, host_initiated=False)
    a.close()
    b.close()


def peer(buf_alloc, fwd_cnt):
    return Header(3, 2, 1024, 52, 0, 1, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, buf_alloc, fwd_cnt)


def test_header_is_44_bytes_and_round_trips():
    h = Header(2, 3, 1, 2, 3, 1, 5, 0, 7, 8)
    assert len(h.pack()) == HDR_SIZE == 44 and Header.unpack(h.pack()) == h


@given(start=st.integers(0, U32), sent=st.integers(0, 1 << 20), buf=st.integers(0, 1 << 20))
def test_peer_credit_wraps(start, sent, buf):
    a, b = socket.socketpair()
    try:
        c = Connection(3, 52, 1024, a, host_initiated=False)
        c.tx_cnt = start
        c.note_peer(peer(buf, start))
        assert c.peer_credit() == buf
        c.sent_to_guest(sent)
        assert c.peer_credit() == max(0, buf - sent)
    finally:
        a.close()
        b.close()


def test_inconsistent_guest_figures_mean_no_credit(conn):
    conn.tx_cnt = 10
    conn.note_peer(peer(100, 50))          # the guest claims to have consumed bytes never sent
    assert conn.peer_credit() == 0


def test_guest_bytes_beyond_our_buffer_are_refused(conn):
    conn.tx_buf = bytearray(CONN_BUF_ALLOC - 10)
    assert conn.accept_guest_bytes(10)
    assert not conn.accept_guest_bytes(11)


def test_credit_update_owed_only_when_the_guest_thinks_room_is_low(conn):
    conn.rx_cnt = CONN_BUF_ALLOC // 4
    conn.forwarded(CONN_BUF_ALLOC // 4)
    assert not conn.wants_credit_update()              # the guest still sees 3/4 free
    conn.rx_cnt = CONN_BUF_ALLOC * 3 // 4
    conn.forwarded(CONN_BUF_ALLOC // 2)
    assert conn.wants_credit_update()
    h = conn.header(VIRTIO_VSOCK_OP_RW, length=1)
    assert h.fwd_cnt == conn.fwd_cnt and h.buf_alloc == CONN_BUF_ALLOC
    assert not conn.wants_credit_update()              # every packet carries the figures


def test_credit_packets_are_not_owed_twice(conn):
    conn.owe(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    conn.owe(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    conn.owe(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    assert [op for op, _ in conn.pending] == [VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_CREDIT_REQUEST]
