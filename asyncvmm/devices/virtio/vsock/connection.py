"""One vsock stream connection's state and credit arithmetic (§5.10.6.3).  No I/O.

A :class:`Connection` joins a guest port to a host Unix stream socket.  Its
fields are the two flow-control ledgers:

* guest -> host: ``rx_cnt`` bytes received from the guest, ``fwd_cnt`` of
  them written to the host socket, ``tx_buf`` the rest (never more than the
  ``buf_alloc`` we advertise: a guest that sends past its credit is reset);
* host -> guest: ``tx_cnt`` bytes sent to the guest against the guest's
  advertised ``peer_buf_alloc`` and ``peer_fwd_cnt``.

The counters are free-running u32s, so every difference is taken mod 2**32.
``pending`` holds the control operations owed to the guest, oldest first;
:class:`~asyncvmm.devices.virtio.vsock.muxer.VsockMuxer` does the I/O and
asks this object what to send.
"""

from __future__ import annotations

import enum
import socket

from asyncvmm.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)

U32 = 0xFFFF_FFFF
# What each connection may buffer of the guest's data while the host socket
# is not taking it: the buf_alloc we advertise, so the memory is bounded.
CONN_BUF_ALLOC = 256 * 1024
# Tell the guest about consumed bytes once it believes less than this much room is left.
CREDIT_UPDATE_LOW_WATER = CONN_BUF_ALLOC // 2


class State(enum.Enum):
    LOCAL_INIT = "local-init"     # host-initiated: REQUEST owed or sent, waiting for RESPONSE
    ESTABLISHED = "established"


class Connection:
    __slots__ = ("guest_cid", "local_port", "peer_port", "state", "sock", "host_initiated",
                 "rx_cnt", "fwd_cnt", "last_fwd_cnt_sent", "tx_buf",
                 "tx_cnt", "peer_buf_alloc", "peer_fwd_cnt", "credit_requested",
                 "pending", "host_readable", "host_eof", "guest_shut_send", "guest_shut_rcv",
                 "host_wr_shut", "reading", "writing", "timer")

    def __init__(self, guest_cid: int, local_port: int, peer_port: int, sock: socket.socket,
                 *, host_initiated: bool) -> None:
        self.guest_cid = guest_cid
        self.local_port = local_port          # the host end's port (CID 2)
        self.peer_port = peer_port            # the guest end's port
        self.sock = sock
        self.host_initiated = host_initiated
        self.state = State.LOCAL_INIT if host_initiated else State.ESTABLISHED
        # guest -> host
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_cnt_sent = 0
        self.tx_buf = bytearray()
        # host -> guest
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_requested = False
        # what the guest is owed and what each side has closed
        self.pending: list[tuple[int, int]] = []      # (op, flags)
        self.host_readable = False            # the socket polled readable and was not drained
        self.host_eof = False                 # the host side will send no more
        self.guest_shut_send = False          # the guest will send no more
        self.guest_shut_rcv = False           # the guest will receive no more
        self.host_wr_shut = False             # we shut the host socket's write side
        # I/O bookkeeping the muxer keeps here (loop reader/writer registered, a timer)
        self.reading = False
        self.writing = False
        self.timer = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # -- what we tell the guest -----------------------------------------------

    def header(self, op: int, *, length: int = 0, flags: int = 0) -> Header:
        """A packet from this connection's host end; it carries our current credit."""
        self.last_fwd_cnt_sent = self.fwd_cnt
        return Header(VMADDR_CID_HOST, self.guest_cid, self.local_port, self.peer_port, length,
                      VIRTIO_VSOCK_TYPE_STREAM, op, flags, CONN_BUF_ALLOC, self.fwd_cnt)

    def owe(self, op: int, flags: int = 0) -> None:
        """Queue a control packet for the guest (a duplicate credit packet is not queued twice)."""
        if op in (VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_CREDIT_REQUEST) and \
                any(p[0] == op for p in self.pending):
            return
        self.pending.append((op, flags))

    def guest_room(self) -> int:
        """How much the guest believes it may still send us."""
        return CONN_BUF_ALLOC - ((self.rx_cnt - self.last_fwd_cnt_sent) & U32)

    def wants_credit_update(self) -> bool:
        """We forwarded bytes the guest does not know about and it thinks room is low."""
        return self.fwd_cnt != self.last_fwd_cnt_sent and self.guest_room() < CREDIT_UPDATE_LOW_WATER

    # -- what the guest tells us ----------------------------------------------

    def note_peer(self, hdr: Header) -> None:
        """Every guest packet carries its buffer space and consumed count."""
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.peer_credit() > 0:
            self.credit_requested = False

    def peer_credit(self) -> int:
        """Bytes we may still send to the guest (0 if the guest's figures are inconsistent)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def accept_guest_bytes(self, n: int) -> bool:
        """Count ``n`` bytes from the guest; ``False`` if they exceed the credit we gave."""
        self.rx_cnt = (self.rx_cnt + n) & U32
        return len(self.tx_buf) + n <= CONN_BUF_ALLOC

    def forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def sent_to_guest(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32

    # -- what the host end should do ------------------------------------------

    @property
    def wants_host_data(self) -> bool:
        """Whether to read the host socket: established, open that way, and the guest has room."""
        return (self.state is State.ESTABLISHED and not self.host_eof and not self.guest_shut_rcv
                and self.peer_credit() > 0)

    @property
    def fully_shut(self) -> bool:
        """Neither side will send more and nothing is left to forward: time to reset."""
        return self.host_eof and self.guest_shut_send and not self.tx_buf
