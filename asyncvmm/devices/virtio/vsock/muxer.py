"""The host side of virtio-vsock: Firecracker's hybrid Unix-socket model.

* Host-initiated: a host process connects to ``uds_path`` and writes
  ``CONNECT <port>\\n``; the muxer sends the guest a REQUEST for that port
  and, on the guest's RESPONSE, answers ``OK <host port>\\n`` on the socket,
  which is from then on a byte stream to the guest's listener.  A RST (no
  listener) or no answer within :data:`CONNECT_TIMEOUT_S` closes the socket, and so
  does a line not complete within :data:`CONNECT_LINE_TIMEOUT_S`.
* Guest-initiated: a REQUEST to host port P connects to ``<uds_path>_P``; a
  refused or missing socket answers RST.

This module is the I/O glue around :class:`Connection` (the state and
credit arithmetic): it owns the listener, the host sockets, their loop
readers and writers and the timers.  The device handler gives it the
guest's packets (:meth:`VsockMuxer.on_guest_packet`) and asks it for packets
to fill RX chains (:meth:`VsockMuxer.fill_rx`); when something for the guest
appears it calls the ``wake_rx`` hook.  Host data is read straight into the
guest's RX buffers, and only while the guest has credit and buffers, so
nothing is buffered host-side in that direction; the other way at most
``CONN_BUF_ALLOC`` bytes per connection wait for a slow host socket.

Everything runs on the loop; a guest can make the muxer drop packets and
reset connections, never raise.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import resource
import socket
import stat
from typing import Callable, Sequence

from asyncvmm.devices.virtio.vsock.connection import Connection, State
from asyncvmm.devices.virtio.vsock.metrics import VsockMetrics
from asyncvmm.devices.virtio.vsock.packet import (
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)

log = logging.getLogger(__name__)

# Firecracker's limit on live connections per device; lower when the process may open fewer
# files, so a guest cannot take the descriptors the rest of the VMM needs.
MAX_CONNECTIONS = 1023
FD_HEADROOM = 128
# A guest that neither accepts nor refuses a host connection within this long is refused for it.
CONNECT_TIMEOUT_S = 2.0
# After the guest shuts down both ways, the host socket has this long to take what is left.
SHUTDOWN_FLUSH_TIMEOUT_S = 2.0
# Host ports of host-initiated connections start here (out of the way of well-known ports).
FIRST_LOCAL_PORT = 1 << 30
# "CONNECT 4294967295\n" is 19 bytes; a line longer than this is not a request.
MAX_CONNECT_LINE = 32
# A host connection that has not sent its whole CONNECT line within this long is closed, so idle
# host sockets cannot hold the connection slots.
CONNECT_LINE_TIMEOUT_S = 5.0
# accept() failing (EMFILE and friends) stops watching the listener for this long: the pending
# connection keeps it readable, and retrying at every loop turn would spin.
ACCEPT_RETRY_S = 0.1
# RSTs for packets that belong to no connection, waiting for an RX buffer; beyond this they are dropped.
MAX_PENDING_RSTS = 256
LISTEN_BACKLOG = 128


@dataclasses.dataclass(eq=False)
class _PendingHost:
    """An accepted host socket whose ``CONNECT`` line is still arriving."""
    sock: socket.socket
    line: bytearray = dataclasses.field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


class VsockBackendError(Exception):
    """The host side could not be set up (binding ``uds_path``)."""


def connection_limit() -> int:
    """:data:`MAX_CONNECTIONS`, or fewer: the open-files limit less :data:`FD_HEADROOM`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - FD_HEADROOM))


def bind_listener(path: str) -> socket.socket:
    """A non-blocking Unix stream listener at ``path``; OSError as the kernel gives it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def check_uds_path(path: str) -> None:
    """Bind a listener at ``path`` and release it again: PUT /vsock fails where Firecracker's bind
    would (an existing file, a missing directory, no permission); the VMM binds for real at
    InstanceStart."""
    sock = bind_listener(path)
    sock.close()
    os.unlink(path)


class VsockMuxer:
    """Connections between the guest (CID ``guest_cid``) and Unix sockets around ``uds_path``."""

    def __init__(self, guest_cid: int, uds_path: str, loop: asyncio.AbstractEventLoop,
                 metrics: VsockMetrics) -> None:
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.loop = loop
        self.metrics = metrics
        try:
            self.listener = bind_listener(uds_path)
        except OSError as e:
            raise VsockBackendError(f"Error binding to the host-side Unix socket {uds_path}: {e}") from e
        st = os.stat(uds_path)
        self._listener_id = (st.st_dev, st.st_ino)
        self.conns: dict[tuple[int, int], Connection] = {}
        self.rx_ready: dict[tuple[int, int], None] = {}    # insertion-ordered: fair turns
        self.rsts: collections.deque[Header] = collections.deque()
        self.pending_hosts: dict[int, _PendingHost] = {}    # accepted, waiting for CONNECT
        self._next_local_port = FIRST_LOCAL_PORT
        self.max_connections = connection_limit()
        self.wake_rx: Callable[[], None] = lambda: None
        self._filling = False               # inside fill_rx: the pump is already running
        self.closed = False
        self._accept_retry: asyncio.TimerHandle | None = None   # accepts paused after a failure
        self._accept_failing = False        # logged the current run of failed accepts
        loop.add_reader(self.listener.fileno(), self._on_accept)

    # -- the guest's packets ------------------------------------------------

    def on_guest_packet(self, hdr: Header, payload: Sequence[memoryview]) -> None:
        """Act on one TX packet; ``payload`` (guest memory) is consumed before returning."""
        self.metrics.tx_packets_count += 1
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != VMADDR_CID_HOST:
            self.metrics.tx_queue_event_fails += 1
            log.debug("vsock: dropped a packet with wrong CIDs: %s", hdr)
            return
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self._reset_unknown(hdr)
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != VIRTIO_VSOCK_OP_RST:
                self._reset_unknown(hdr)
            return
        conn.note_peer(hdr)
        op = hdr.op
        if conn.state is State.LOCAL_INIT:
            if op == VIRTIO_VSOCK_OP_RESPONSE:
                self._established(conn)
            elif op == VIRTIO_VSOCK_OP_RST:
                self._kill(conn, notify_guest=False)
            else:
                self._kill(conn)
            return
        if op == VIRTIO_VSOCK_OP_RW:
            self._guest_data(conn, payload, hdr.len)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.owe(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            pass                                   # note_peer took the figures
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags)
        elif op == VIRTIO_VSOCK_OP_RST:
            self._kill(conn, notify_guest=False)
            return
        else:                                      # REQUEST on a live connection, RESPONSE, INVALID
            self._kill(conn)
            return
        if conn.key in self.conns:
            self._update(conn)

    def _reset_unknown(self, hdr: Header) -> None:
        """Answer a packet that belongs to no connection with RST (§5.10.6.4)."""
        if len(self.rsts) >= MAX_PENDING_RSTS:
            self.metrics.killq_resync += 1
            return
        self.rsts.append(Header(VMADDR_CID_HOST, self.guest_cid, hdr.dst_port, hdr.src_port, 0,
                                VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST, 0, 0, 0))
        self.wake_rx()

    def _guest_connect(self, hdr: Header) -> None:
        if len(self.conns) + len(self.pending_hosts) >= self.max_connections:
            self._reset_unknown(hdr)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # A Unix stream connect completes (or fails) at once; a full backlog is EAGAIN.
            sock.connect(f"{self.uds_path}_{hdr.dst_port}")
        except OSError as e:
            sock.close()
            log.debug("vsock: guest connection to host port %d refused: %s", hdr.dst_port, e)
            self._reset_unknown(hdr)
            return
        conn = Connection(self.guest_cid, hdr.dst_port, hdr.src_port, sock, host_initiated=False)
        conn.note_peer(hdr)
        self.conns[conn.key] = conn
        self.metrics.conns_added += 1
        conn.owe(VIRTIO_VSOCK_OP_RESPONSE)
        self._update(conn)

    def _established(self, conn: Connection) -> None:
        self._cancel_timer(conn)
        conn.state = State.ESTABLISHED
        try:
            conn.sock.send(f"OK {conn.local_port}\n".encode())
        except OSError as e:
            log.debug("vsock: host connection gone before OK: %s", e)
            self._kill(conn)
            return
        self._update(conn)

    def _guest_data(self, conn: Connection, payload: Sequence[memoryview], length: int) -> None:
        if conn.guest_shut_send or not conn.accept_guest_bytes(length):
            self.metrics.tx_write_fails += 1
            log.debug("vsock: connection %s sent past its credit or after SHUTDOWN; reset", conn.key)
            self._kill(conn)
            return
        self.metrics.tx_bytes_count += length
        if conn.tx_buf:
            for view in payload:
                conn.tx_buf += view
            return
        try:
            sent = conn.sock.sendmsg(payload) if length else 0
        except BlockingIOError:
            sent = 0
        except OSError as e:
            log.debug("vsock: host socket of %s failed: %s", conn.key, e)
            self.metrics.tx_write_fails += 1
            self._kill(conn)
            return
        conn.forwarded(sent)
        if sent < length:
            skip = sent
            for view in payload:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                conn.tx_buf += view[skip:]
                skip = 0

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.tx_buf)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("vsock: host socket of %s failed: %s", conn.key, e)
            self.metrics.tx_flush_fails += 1
            self._kill(conn)
            return
        del conn.tx_buf[:sent]
        conn.forwarded(sent)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            conn.guest_shut_rcv = True
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            conn.guest_shut_send = True
        if conn.guest_shut_rcv and conn.guest_shut_send and conn.timer is None:
            # The guest closed; the host socket gets a moment to take what is buffered.
            conn.timer = self.loop.call_later(SHUTDOWN_FLUSH_TIMEOUT_S, self._on_timeout, conn.key)

    # -- host sockets -------------------------------------------------------

    def _on_accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:                   # EMFILE and friends
                self._pause_accepts(e)
                return
            if self._accept_failing:
                self._accept_failing = False
                log.warning("vsock: accepting on %s again", self.uds_path)
            if len(self.conns) + len(self.pending_hosts) >= self.max_connections:
                self.metrics.muxer_event_fails += 1
                sock.close()
                continue
            sock.setblocking(False)
            pending = _PendingHost(sock)
            pending.timer = self.loop.call_later(CONNECT_LINE_TIMEOUT_S, self._on_connect_line_timeout, pending)
            self.pending_hosts[sock.fileno()] = pending
            self.loop.add_reader(sock.fileno(), self._on_connect_line, pending)

    def _pause_accepts(self, err: OSError) -> None:
        """Stop watching the listener for :data:`ACCEPT_RETRY_S`; one warning per run of failures."""
        self.metrics.muxer_event_fails += 1
        if not self._accept_failing:
            self._accept_failing = True
            log.warning("vsock: accept on %s failed: %s; retrying every %g s", self.uds_path, err, ACCEPT_RETRY_S)
        self.loop.remove_reader(self.listener.fileno())
        self._accept_retry = self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepts)

    def _resume_accepts(self) -> None:
        self._accept_retry = None
        if not self.closed:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _on_connect_line(self, pending: _PendingHost) -> None:
        """Read ``CONNECT <port>\\n`` and nothing after it (the stream's data is the guest's): peek
        for the newline, take the bytes up to it, keep a partial line until the rest comes."""
        sock = pending.sock
        try:
            peek = sock.recv(MAX_CONNECT_LINE - len(pending.line), socket.MSG_PEEK)
            end = peek.find(b"\n")
            got = sock.recv(end + 1 if end >= 0 else len(peek)) if peek else b""
        except BlockingIOError:
            return
        except OSError:
            got = b""
        pending.line += got
        complete = pending.line.endswith(b"\n")
        if got and not complete and len(pending.line) < MAX_CONNECT_LINE:
            return                                 # the rest of the line is still coming
        self._drop_pending_host(pending, close=False)
        port = parse_connect_line(bytes(pending.line[:-1])) if complete else None
        if port is None:                           # malformed, too long, or closed mid-line
            self.metrics.muxer_event_fails += 1
            sock.close()
            return
        local_port = self._allocate_local_port()
        if local_port is None:
            sock.close()
            return
        conn = Connection(self.guest_cid, local_port, port, sock, host_initiated=True)
        self.conns[conn.key] = conn
        self.metrics.conns_added += 1
        conn.owe(VIRTIO_VSOCK_OP_REQUEST)
        conn.timer = self.loop.call_later(CONNECT_TIMEOUT_S, self._on_timeout, conn.key)
        self._update(conn)

    def _on_connect_line_timeout(self, pending: _PendingHost) -> None:
        pending.timer = None
        log.debug("vsock: host connection sent no CONNECT line within %g s; closed", CONNECT_LINE_TIMEOUT_S)
        self.metrics.muxer_event_fails += 1
        self._drop_pending_host(pending, close=True)

    def _drop_pending_host(self, pending: _PendingHost, *, close: bool) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        self.pending_hosts.pop(pending.sock.fileno(), None)
        self.loop.remove_reader(pending.sock.fileno())
        if close:
            pending.sock.close()

    def _allocate_local_port(self) -> int | None:
        for _ in range(len(self.conns) + 1):
            port = self._next_local_port
            self._next_local_port = FIRST_LOCAL_PORT if port >= 0xFFFF_FFFE else port + 1
            if not any(k[0] == port for k in self.conns):
                return port
        return None

    def _on_host_readable(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is None:
            return
        conn.host_readable = True
        self._update(conn)
        self.wake_rx()

    def _on_host_writable(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is None:
            return
        self._flush(conn)
        if conn.key in self.conns:
            self._update(conn)
            if conn.key in self.rx_ready:
                self.wake_rx()

    def _on_timeout(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is not None:
            conn.timer = None
            log.debug("vsock: connection %s timed out (%s)", key, conn.state.value)
            self._kill(conn)

    # -- one place decides interest and readiness ---------------------------

    def _update(self, conn: Connection) -> None:
        """After anything changed: shut down what is done, poll what is wanted, queue RX work."""
        if conn.guest_shut_send and not conn.tx_buf and not conn.host_wr_shut:
            conn.host_wr_shut = True
            _shutdown_write(conn.sock)
        if conn.fully_shut or (conn.guest_shut_send and conn.guest_shut_rcv and not conn.tx_buf):
            self._kill(conn)
            return
        if conn.wants_credit_update():
            conn.owe(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        if conn.state is State.ESTABLISHED and conn.peer_credit() == 0 and not conn.credit_requested \
                and (conn.host_readable or conn.reading) and not conn.host_eof:
            conn.credit_requested = True
            conn.owe(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        want_read = conn.wants_host_data and not conn.host_readable
        if want_read != conn.reading:
            fd = conn.sock.fileno()
            if want_read:
                self.loop.add_reader(fd, self._on_host_readable, conn.key)
            else:
                self.loop.remove_reader(fd)
            conn.reading = want_read
        want_write = bool(conn.tx_buf)
        if want_write != conn.writing:
            fd = conn.sock.fileno()
            if want_write:
                self.loop.add_writer(fd, self._on_host_writable, conn.key)
            else:
                self.loop.remove_writer(fd)
            conn.writing = want_write
        has_work = bool(conn.pending) or (conn.host_readable and conn.wants_host_data)
        if has_work:
            self.rx_ready.setdefault(conn.key, None)
            if not self._filling:
                self.wake_rx()                     # the handler runs one pump per loop turn at most
        else:
            self.rx_ready.pop(conn.key, None)

    # -- packets for the guest ----------------------------------------------

    def has_rx(self) -> bool:
        return bool(self.rsts or self.rx_ready)

    def fill_rx(self, payload: list[memoryview], capacity: int) -> tuple[Header, int] | None:
        """The next packet for the guest: its header and how many payload bytes went into
        ``payload`` (guest memory, ``capacity`` bytes); ``None`` when nothing is ready."""
        if self.rsts:
            return self.rsts.popleft(), 0
        # One pass: a connection that cannot use this buffer (it has data and the
        # buffer has no room past the header) keeps its turn for the next one.
        self._filling = True
        try:
            for key in list(self.rx_ready):
                conn = self.conns.get(key)
                if conn is None:
                    self.rx_ready.pop(key, None)
                    continue
                out = self._next_from(conn, payload, capacity)
                if out is None and conn.key in self.conns and conn.pending == [] and \
                        conn.host_readable and capacity == 0:
                    continue
                self.rx_ready.pop(key, None)
                if conn.key in self.conns:
                    self._update(conn)              # still has work: to the back of the line
                if out is not None:
                    return out
            return None
        finally:
            self._filling = False

    def _next_from(self, conn: Connection, payload: list[memoryview],
                   capacity: int) -> tuple[Header, int] | None:
        if conn.pending:
            op, flags = conn.pending.pop(0)
            return conn.header(op, flags=flags), 0
        if not (conn.host_readable and conn.wants_host_data):
            return None
        want = min(conn.peer_credit(), capacity, MAX_PKT_PAYLOAD)
        if want == 0:
            return None
        try:
            n, _, _, _ = conn.sock.recvmsg_into(_clip(payload, want))
        except BlockingIOError:
            conn.host_readable = False
            return None
        except OSError as e:
            log.debug("vsock: host socket of %s failed: %s", conn.key, e)
            self.metrics.rx_read_fails += 1
            self._kill(conn)
            return None
        if n == 0:
            # The host end will send no more; its receive side may still be open.
            conn.host_eof = True
            conn.host_readable = False
            return conn.header(VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND), 0
        if n < want:
            conn.host_readable = False               # most likely drained; the reader says when not
        conn.sent_to_guest(n)
        self.metrics.rx_bytes_count += n
        return conn.header(VIRTIO_VSOCK_OP_RW, length=n), n

    # -- teardown -----------------------------------------------------------

    def _kill(self, conn: Connection, *, notify_guest: bool = True) -> None:
        """Forget ``conn`` and close its host socket; the guest gets a RST unless it sent one."""
        self.conns.pop(conn.key, None)
        self.rx_ready.pop(conn.key, None)
        self._release(conn)
        if notify_guest:
            self.metrics.conns_killed += 1
            if len(self.rsts) < MAX_PENDING_RSTS:
                self.rsts.append(conn.header(VIRTIO_VSOCK_OP_RST))
                if not self._filling:
                    self.wake_rx()
            else:
                self.metrics.killq_resync += 1

    def _release(self, conn: Connection) -> None:
        self._cancel_timer(conn)
        fd = conn.sock.fileno()
        if conn.reading:
            self.loop.remove_reader(fd)
        if conn.writing:
            self.loop.remove_writer(fd)
        conn.reading = conn.writing = False
        conn.tx_buf = bytearray()
        conn.sock.close()
        self.metrics.conns_removed += 1

    def _cancel_timer(self, conn: Connection) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def reset_connections(self) -> None:
        """Drop every connection without telling the guest (a device reset, a transport reset)."""
        for conn in list(self.conns.values()):
            self._release(conn)
        self.conns.clear()
        self.rx_ready.clear()
        self.rsts.clear()

    def close(self) -> None:
        """Close everything, and remove ``uds_path`` if it is still our listener."""
        if self.closed:
            return
        self.closed = True
        self.reset_connections()
        for pending in list(self.pending_hosts.values()):
            self._drop_pending_host(pending, close=True)
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            st = os.stat(self.uds_path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.uds_path)
        except OSError:
            pass

    def open_fds(self) -> int:
        """Host sockets held (connections, pending CONNECT lines, the listener): for leak checks."""
        return len(self.conns) + len(self.pending_hosts) + (0 if self.closed else 1)


def parse_connect_line(line: bytes) -> int | None:
    """The port of ``CONNECT <port>`` (without its newline), or ``None``."""
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    verb, _, port = text.partition(" ")
    if verb != "CONNECT" or not port.strip().isdigit():
        return None
    value = int(port.strip())
    return value if value <= 0xFFFF_FFFF else None


def _clip(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for view in views:
        if n <= 0:
            break
        out.append(view[:n])
        n -= len(out[-1])
    return out


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


__all__ = ["VsockBackendError", "VsockMuxer", "bind_listener", "check_uds_path",
           "parse_connect_line"]
