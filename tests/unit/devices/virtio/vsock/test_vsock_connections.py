"""virtio-vsock through the transport: both connection directions, data, credit, shutdown, resets."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct

import pytest

from asyncvmm.devices.virtio.spec import VIRTIO_ID_VSOCK
from asyncvmm.devices.virtio.vsock import Vsock, VsockBackendError, muxer as muxer_mod
from asyncvmm.devices.virtio.vsock.connection import CONN_BUF_ALLOC
from asyncvmm.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VMADDR_CID_HOST,
)
from tests.fakes.virtio_driver import Buf
from tests.unit.devices.virtio.vsock.helpers import GUEST_CID, host_recv_exactly


async def guest_connect(vr, guest_port: int, host_port: int, srv=None, **kw):
    """The guest opens a connection to host port ``host_port``; returns the host's accepted socket."""
    srv = srv or vr.listen(host_port)
    vr.guest.send(VIRTIO_VSOCK_OP_REQUEST, guest_port, host_port, **kw)
    hdr, _ = await vr.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RESPONSE, hdr
    assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port) == (VMADDR_CID_HOST, GUEST_CID, host_port, guest_port)
    conn, _ = await asyncio.get_running_loop().sock_accept(srv)
    conn.setblocking(False)
    return conn


async def host_connect(vr, guest_port: int):
    """A host process connects to guest port ``guest_port``; returns (socket, host port)."""
    sock = await vr.host_connect(f"CONNECT {guest_port}\n".encode())
    hdr, _ = await vr.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST and hdr.dst_port == guest_port and hdr.dst_cid == GUEST_CID
    vr.guest.send(VIRTIO_VSOCK_OP_RESPONSE, guest_port, hdr.src_port)
    line = await host_recv_exactly(sock, len(f"OK {hdr.src_port}\n"))
    assert line == f"OK {hdr.src_port}\n".encode()
    return sock, hdr.src_port


def test_identity(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        dev = Vsock(42, str(tmp_path / "s"), loop)
        assert dev.device_type == VIRTIO_ID_VSOCK == 19 and dev.num_queues == 3
        assert dev.read_config(0, 8) == struct.pack("<Q", 42)
        assert os.path.exists(tmp_path / "s")
        dev.close()
        assert not os.path.exists(tmp_path / "s")          # our listener's path goes with us
    finally:
        loop.close()


def test_bind_failure_is_a_backend_error(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        (tmp_path / "taken").write_text("")
        with pytest.raises(VsockBackendError, match="Address already in use"):
            Vsock(3, str(tmp_path / "taken"), loop)
        assert (tmp_path / "taken").read_text() == ""     # nothing of someone else's was removed
    finally:
        loop.close()


async def test_guest_initiated_both_directions(vsock):
    host = await guest_connect(vsock, 1024, 52)
    vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 52, b"hello host")
    assert await host_recv_exactly(host, 10) == b"hello host"
    await asyncio.get_running_loop().sock_sendall(host, b"hello guest")
    got = b""
    while len(got) < 11:
        hdr, data = await vsock.guest.recv()
        assert hdr.op == VIRTIO_VSOCK_OP_RW and hdr.len == len(data)
        assert hdr.buf_alloc == CONN_BUF_ALLOC
        got += data
    assert got == b"hello guest"
    assert vsock.dev.metrics.tx_bytes_count == 10 and vsock.dev.metrics.rx_bytes_count == 11
    host.close()


async def test_guest_connect_without_listener_is_reset(vsock):
    vsock.guest.send(VIRTIO_VSOCK_OP_REQUEST, 1024, 9999)
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RST and (hdr.src_port, hdr.dst_port) == (9999, 1024)
    assert not vsock.dev.muxer.conns


async def test_host_initiated_both_directions(vsock):
    host, port = await host_connect(vsock, 5000)
    assert port >= muxer_mod.FIRST_LOCAL_PORT
    await asyncio.get_running_loop().sock_sendall(host, b"ping")
    hdr, data = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RW and data == b"ping" and hdr.src_port == port
    vsock.guest.send(VIRTIO_VSOCK_OP_RW, 5000, port, b"pong")
    assert await host_recv_exactly(host, 4) == b"pong"
    host.close()


async def test_bytes_after_the_connect_line_are_the_streams(vsock):
    sock = await vsock.host_connect(b"CONNECT 77\nearly bytes")
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST
    vsock.guest.send(VIRTIO_VSOCK_OP_RESPONSE, 77, hdr.src_port)
    got = b""
    while len(got) < 11:
        h, data = await vsock.guest.recv()
        if h.op == VIRTIO_VSOCK_OP_RW:
            got += data
    assert got == b"early bytes"
    assert (await host_recv_exactly(sock, len(f"OK {hdr.src_port}\n"))).startswith(b"OK ")
    sock.close()


async def test_guest_refuses_host_connection(vsock):
    sock = await vsock.host_connect(b"CONNECT 6000\n")
    hdr, _ = await vsock.guest.recv()
    vsock.guest.send(VIRTIO_VSOCK_OP_RST, 6000, hdr.src_port)
    assert await host_recv_exactly(sock, 1) == b""           # closed, no OK
    await vsock.guest.quiet()
    assert not vsock.dev.muxer.conns
    sock.close()


async def test_unanswered_host_connection_times_out(vsock, monkeypatch):
    monkeypatch.setattr(muxer_mod, "CONNECT_TIMEOUT_S", 0.05)
    sock = await vsock.host_connect(b"CONNECT 6001\n")
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST
    assert await host_recv_exactly(sock, 1) == b""
    rst, _ = await vsock.guest.recv()
    assert rst.op == VIRTIO_VSOCK_OP_RST and rst.dst_port == 6001
    assert vsock.dev.metrics.conns_killed == 1
    sock.close()


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT 99999999999\n", b"A" * 40])
async def test_bad_connect_line_is_closed(vsock, line):
    sock = await vsock.host_connect(line)
    assert await host_recv_exactly(sock, 1) == b""
    assert not vsock.dev.muxer.conns and not vsock.dev.muxer.pending_hosts
    assert await vsock.guest.quiet() == []                   # the guest heard nothing
    sock.close()


def test_parse_connect_line():
    assert muxer_mod.parse_connect_line(b"CONNECT 52") == 52
    assert muxer_mod.parse_connect_line(b"CONNECT  52 ") == 52
    assert muxer_mod.parse_connect_line(b"CONNECT 4294967295") == 0xFFFF_FFFF
    for bad in (b"CONNECT", b"CONNECT -1", b"connect 5", b"CONNECT 4294967296", b"\xff"):
        assert muxer_mod.parse_connect_line(bad) is None


async def test_host_data_respects_guest_credit(vsock):
    """The guest advertises 1000 bytes: no more arrives until it says it consumed some."""
    host = await guest_connect(vsock, 1024, 53, buf_alloc=1000)
    await asyncio.get_running_loop().sock_sendall(host, bytes(range(250)) * 20)    # 5000 bytes
    got, ops = b"", []
    for hdr, data in await vsock.guest.quiet(0.2):
        ops.append(hdr.op)
        got += data
    assert len(got) == 1000 and VIRTIO_VSOCK_OP_CREDIT_REQUEST in ops
    total = got
    while len(total) < 5000:
        vsock.guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 1024, 53, buf_alloc=1000, fwd_cnt=len(total))
        more = b"".join(d for h, d in await vsock.guest.quiet(0.1) if h.op == VIRTIO_VSOCK_OP_RW)
        assert 0 < len(more) <= 1000
        total += more
    assert total == bytes(range(250)) * 20
    host.close()


async def test_credit_request_is_answered(vsock):
    host = await guest_connect(vsock, 1024, 54)
    vsock.guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 1024, 54)
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and hdr.buf_alloc == CONN_BUF_ALLOC
    host.close()


async def test_slow_host_reader_bounds_buffering_and_credit_comes_back(vsock):
    """A guest that honours its credit fills at most CONN_BUF_ALLOC host-side; then updates flow."""
    host = await guest_connect(vsock, 1024, 55)
    muxer = vsock.dev.muxer
    conn = next(iter(muxer.conns.values()))
    sent, fwd_seen, chunk = 0, 0, bytes(range(256)) * 256           # 64 KiB
    while CONN_BUF_ALLOC - (sent - fwd_seen) >= len(chunk):
        vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 55, chunk)
        sent += len(chunk)
        for hdr, _ in await vsock.guest.quiet(0.01):
            fwd_seen = max(fwd_seen, hdr.fwd_cnt)
        assert len(conn.tx_buf) <= CONN_BUF_ALLOC
        if sent > 16 * CONN_BUF_ALLOC:
            pytest.fail("the host socket never filled up")
    assert len(conn.tx_buf) > 0                        # the host is not reading: some waits with us
    got = await host_recv_exactly(host, sent)
    assert got == chunk * (sent // len(chunk))
    updates = [h for h, _ in await vsock.guest.quiet(0.1)]
    assert updates and all(h.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE for h in updates)
    # Once the host caught up, the guest again believes at least half the buffer is free.
    assert sent - updates[-1].fwd_cnt < CONN_BUF_ALLOC // 2
    assert conn.fwd_cnt == sent and not conn.tx_buf
    host.close()


async def test_guest_past_its_credit_is_reset(vsock):
    host = await guest_connect(vsock, 1024, 56)
    chunk = bytes(64 * 1024)
    for _ in range(64):                                # 4 MiB at a host that never reads
        vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 56, chunk)
        await asyncio.sleep(0)
        if not vsock.dev.muxer.conns:
            break
    assert not vsock.dev.muxer.conns
    ops = [h.op for h, _ in await vsock.guest.quiet()]
    assert VIRTIO_VSOCK_OP_RST in ops
    assert vsock.dev.metrics.tx_write_fails >= 1
    host.close()


async def test_host_half_close_then_guest_close(vsock):
    host = await guest_connect(vsock, 1024, 57)
    host.shutdown(socket.SHUT_WR)
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_SHUTDOWN and hdr.flags == VIRTIO_VSOCK_SHUTDOWN_SEND
    vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 57, b"still talking")   # the other way is open
    assert await host_recv_exactly(host, 13) == b"still talking"
    vsock.guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 1024, 57,
                     flags=VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RST
    assert await host_recv_exactly(host, 1) == b""
    assert not vsock.dev.muxer.conns
    host.close()


async def test_guest_shutdown_send_leaves_host_to_guest_open(vsock):
    host = await guest_connect(vsock, 1024, 58)
    vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 58, b"last words")
    vsock.guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 1024, 58, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert await host_recv_exactly(host, 100) == b"last words"         # then EOF
    await asyncio.get_running_loop().sock_sendall(host, b"reply")
    hdr, data = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RW and data == b"reply"
    host.close()
    hdr, _ = await vsock.guest.recv()                  # host EOF + guest done sending: reset
    assert hdr.op == VIRTIO_VSOCK_OP_SHUTDOWN or hdr.op == VIRTIO_VSOCK_OP_RST
    if hdr.op == VIRTIO_VSOCK_OP_SHUTDOWN:
        hdr, _ = await vsock.guest.recv()
        assert hdr.op == VIRTIO_VSOCK_OP_RST
    assert not vsock.dev.muxer.conns


async def test_host_closing_early_resets_the_guest(vsock):
    host = await guest_connect(vsock, 1024, 59)
    host.close()
    ops = []
    for _ in range(20):
        vsock.guest.send(VIRTIO_VSOCK_OP_RW, 1024, 59, b"x" * 1000)
        ops += [h.op for h, _ in await vsock.guest.quiet(0.01)]
        if VIRTIO_VSOCK_OP_RST in ops:
            break
    assert VIRTIO_VSOCK_OP_RST in ops and not vsock.dev.muxer.conns


async def test_guest_rst_closes_host_socket(vsock):
    host = await guest_connect(vsock, 1024, 60)
    vsock.guest.send(VIRTIO_VSOCK_OP_RST, 1024, 60)
    assert await host_recv_exactly(host, 1) == b""
    assert not vsock.dev.muxer.conns
    host.close()


async def test_fifty_connections_and_nothing_leaks(vsock):
    srv = vsock.listen(61)
    before = len(os.listdir("/proc/self/fd"))
    hosts = [await guest_connect(vsock, 2000 + i, 61, srv) for i in range(50)]
    for i, host in enumerate(hosts):
        vsock.guest.send(VIRTIO_VSOCK_OP_RW, 2000 + i, 61, f"conn {i}".encode())
    for i, host in enumerate(hosts):
        assert await host_recv_exactly(host, len(f"conn {i}")) == f"conn {i}".encode()
        await asyncio.get_running_loop().sock_sendall(host, f"back {i}".encode())
    got = {}
    while sum(len(v) for v in got.values()) < sum(len(f"back {i}") for i in range(50)):
        hdr, data = await vsock.guest.recv()
        if hdr.op == VIRTIO_VSOCK_OP_RW:
            got[hdr.dst_port] = got.get(hdr.dst_port, b"") + data
    assert all(got[2000 + i] == f"back {i}".encode() for i in range(50))
    assert len(vsock.dev.muxer.conns) == 50
    for i, host in enumerate(hosts):
        vsock.guest.send(VIRTIO_VSOCK_OP_RST, 2000 + i, 61)
        host.close()
    await vsock.guest.quiet()
    assert not vsock.dev.muxer.conns and not vsock.dev.muxer.rx_ready
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_transport_reset_closes_connections_and_tells_the_guest(vsock):
    host = await guest_connect(vsock, 1024, 62)
    evq = vsock.guest.evq
    addr = vsock.rig.alloc.alloc(16)
    vsock.rig.mem.write(addr, b"\xff" * 4)
    head = evq.add_chain([Buf(addr, 8, True)])
    evq.offer(head)
    vsock.rig.driver.kick(evq)
    await vsock.guest.quiet()
    assert evq.take_used() == []                       # event buffers wait for an event
    vsock.dev.transport_reset()
    assert await vsock.rig.driver.wait_used(evq, 1) == [(head, 4)]
    assert vsock.rig.mem.read(addr, 4) == b"\0\0\0\0"  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert await host_recv_exactly(host, 1) == b""
    assert not vsock.dev.muxer.conns
    host.close()


async def test_transport_reset_waits_for_an_event_buffer(vsock):
    vsock.dev.transport_reset()
    await vsock.guest.quiet()
    assert vsock.dev.reset_pending
    evq = vsock.guest.evq
    addr = vsock.rig.alloc.alloc(16)
    head = evq.add_chain([Buf(addr, 4, True)])
    evq.offer(head)
    vsock.rig.driver.kick(evq)
    assert await vsock.rig.driver.wait_used(evq, 1) == [(head, 4)]
    assert not vsock.dev.reset_pending


async def test_driver_reset_drops_connections(vsock):
    host = await guest_connect(vsock, 1024, 63)
    await vsock.rig.driver.reset()
    assert not vsock.dev.muxer.conns
    assert await host_recv_exactly(host, 1) == b""
    host.close()


async def test_connections_beyond_the_limit_are_refused_both_ways(vsock):
    vsock.dev.muxer.max_connections = 2
    srv = vsock.listen(64)
    hosts = [await guest_connect(vsock, 3000 + i, 64, srv) for i in range(2)]
    vsock.guest.send(VIRTIO_VSOCK_OP_REQUEST, 3002, 64)          # a third from the guest
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RST and hdr.dst_port == 3002
    sock = await vsock.host_connect(b"CONNECT 9\n")              # and from the host
    assert await host_recv_exactly(sock, 1) == b""
    assert len(vsock.dev.muxer.conns) == 2 and vsock.dev.metrics.muxer_event_fails == 1
    for h in hosts + [sock]:
        h.close()


def test_the_connection_limit_leaves_file_descriptors_for_the_vmm(monkeypatch):
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert muxer_mod.connection_limit() == 1024 - muxer_mod.FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert muxer_mod.connection_limit() == muxer_mod.MAX_CONNECTIONS == 1023


async def test_a_partial_connect_line_is_read_not_polled_for(vsock, monkeypatch):
    muxer = vsock.dev.muxer
    calls = []
    real = muxer._on_connect_line
    monkeypatch.setattr(muxer, "_on_connect_line", lambda pending: (calls.append(1), real(pending)))
    sock = await vsock.host_connect(b"CONN")
    await vsock.guest.quiet(0.1)                              # many loop turns, no new bytes
    (pending,) = muxer.pending_hosts.values()
    assert pending.line == b"CONN"                            # taken off the socket...
    assert len(calls) == 1                                    # ...so the reader fired once, not per turn
    await asyncio.get_running_loop().sock_sendall(sock, b"ECT 77\nearly bytes")
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST and hdr.dst_port == 77
    assert len(calls) <= 3 and not muxer.pending_hosts
    vsock.guest.send(VIRTIO_VSOCK_OP_RESPONSE, 77, hdr.src_port)
    got = b""
    while len(got) < 11:
        h, data = await vsock.guest.recv()
        if h.op == VIRTIO_VSOCK_OP_RW:
            got += data
    assert got == b"early bytes"                              # the bytes after the newline are the stream's
    assert await host_recv_exactly(sock, len(f"OK {hdr.src_port}\n")) == f"OK {hdr.src_port}\n".encode()
    sock.close()


async def test_a_connect_line_longer_than_the_limit_over_several_writes_is_closed(vsock):
    sock = await vsock.host_connect(b"CONNECT 0000000000")
    await vsock.guest.quiet(0.02)
    await asyncio.get_running_loop().sock_sendall(sock, b"0" * 20 + b"1\n")
    assert await host_recv_exactly(sock, 1) == b""
    assert not vsock.dev.muxer.pending_hosts and not vsock.dev.muxer.conns
    assert vsock.dev.metrics.muxer_event_fails == 1
    sock.close()


async def test_a_host_connection_without_its_line_is_closed_and_frees_its_slot(vsock, monkeypatch):
    monkeypatch.setattr(muxer_mod, "CONNECT_LINE_TIMEOUT_S", 0.05)
    vsock.dev.muxer.max_connections = 1
    idle = await vsock.host_connect(b"CONNECT 5")             # never finishes its line
    await vsock.guest.quiet(0.01)
    srv = vsock.listen(70)
    assert len(vsock.dev.muxer.pending_hosts) == 1
    vsock.guest.send(VIRTIO_VSOCK_OP_REQUEST, 1024, 70)      # the slot is taken for now
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_RST
    assert await host_recv_exactly(idle, 1) == b""           # closed by the timeout
    assert not vsock.dev.muxer.pending_hosts and vsock.dev.metrics.muxer_event_fails == 1
    assert await vsock.guest.quiet() == []                   # the guest never heard of it
    host = await guest_connect(vsock, 1025, 70, srv)          # and the slot is free again
    idle.close()
    host.close()


async def test_a_completed_connect_line_stops_its_timer(vsock, monkeypatch):
    monkeypatch.setattr(muxer_mod, "CONNECT_LINE_TIMEOUT_S", 0.05)
    sock = await vsock.host_connect(b"CONNECT 78\n")
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST
    await asyncio.sleep(0.15)                                 # well past the line timeout
    vsock.guest.send(VIRTIO_VSOCK_OP_RESPONSE, 78, hdr.src_port)
    assert await host_recv_exactly(sock, len(f"OK {hdr.src_port}\n")) == f"OK {hdr.src_port}\n".encode()
    assert vsock.dev.metrics.muxer_event_fails == 0 and len(vsock.dev.muxer.conns) == 1
    sock.close()


class _FailingListener:
    """The muxer's listener, with accept() failing as at the open-files limit."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def fileno(self):
        return self.real.fileno()

    def accept(self):
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self):
        self.real.close()


async def test_accept_failure_pauses_the_listener_and_logs_once(vsock, monkeypatch, caplog):
    monkeypatch.setattr(muxer_mod, "ACCEPT_RETRY_S", 0.05)
    muxer = vsock.dev.muxer
    real = muxer.listener
    failing = _FailingListener(real)
    monkeypatch.setattr(muxer, "listener", failing)
    caplog.set_level(logging.WARNING, logger=muxer_mod.__name__)
    sock = await vsock.host_connect(b"CONNECT 79\n")          # queued in the backlog, readable listener
    await asyncio.sleep(0.3)
    # Retried after each pause (a slow loop retries less, a spinning one thousands of times).
    assert 2 <= failing.calls <= 10 and muxer.metrics.muxer_event_fails == failing.calls
    assert [r.getMessage() for r in caplog.records if "accept" in r.getMessage()] == [
        f"vsock: accept on {muxer.uds_path} failed: [Errno {errno.EMFILE}] Too many open files; retrying every 0.05 s"]
    muxer.listener = real                                     # descriptors are back
    hdr, _ = await vsock.guest.recv()
    assert hdr.op == VIRTIO_VSOCK_OP_REQUEST and hdr.dst_port == 79
    assert "accepting on" in caplog.records[-1].getMessage()
    sock.close()
