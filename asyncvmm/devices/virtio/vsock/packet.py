"""virtio-vsock packets (§5.10.6): the header, its names, and parsing a TX chain.  No I/O.

Primer.  Every packet on the RX and TX queues starts with a 44-byte
little-endian header ``struct virtio_vsock_hdr``::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port;
    le32 len; le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

followed, for ``VIRTIO_VSOCK_OP_RW``, by ``len`` payload bytes.  A stream
connection is named by its two (cid, port) ends; the host is CID 2.  Each
side advertises how much it can buffer (``buf_alloc``) and how many bytes it
has consumed so far (``fwd_cnt``); a sender may have at most
``peer buf_alloc - (sent - peer fwd_cnt)`` bytes in flight (§5.10.6.3).
The device may not assume how the driver splits a packet over descriptors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, Segments, collect
from asyncvmm.memory import GuestMemory

# §5.10.4: the host's CID; the guest's comes from the config space.
VMADDR_CID_HOST = 2

VIRTIO_VSOCK_TYPE_STREAM = 1

# §5.10.6: operations.
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

# §5.10.6.5: SHUTDOWN flags, from the sender's point of view.
VIRTIO_VSOCK_SHUTDOWN_RCV = 1      # the sender will receive no more
VIRTIO_VSOCK_SHUTDOWN_SEND = 2     # the sender will send no more

# §5.10.6.6: the event queue's one event.
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
EVENT_SIZE = 4                     # struct virtio_vsock_event { le32 id; }

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size                # 44

# The largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PKT_PAYLOAD = 64 * 1024

OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "INVALID", VIRTIO_VSOCK_OP_REQUEST: "REQUEST",
    VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE", VIRTIO_VSOCK_OP_RST: "RST",
    VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN", VIRTIO_VSOCK_OP_RW: "RW",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE", VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}


@dataclass(slots=True)
class Header:
    """``struct virtio_vsock_hdr``, field for field."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                        self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        return cls(*HDR.unpack_from(data))

    def __str__(self) -> str:
        return (f"{OP_NAMES.get(self.op, self.op)} {self.src_cid}:{self.src_port} -> "
                f"{self.dst_cid}:{self.dst_port} len={self.len}")


class PacketError(Exception):
    """A TX chain that is not a usable vsock packet; it is answered and dropped."""


@dataclass(slots=True)
class TxPacket:
    """A packet the guest sent: its header and, for RW, where its payload lies."""

    head: int
    hdr: Header
    payload: Segments


def parse_tx(mem: GuestMemory, chain: DescriptorChain) -> TxPacket:
    """Read the packet in a TX chain; :class:`PacketError` (or a ChainError) if unusable.

    A TX chain is device-readable only: the header, then ``len`` bytes of
    payload anywhere in the following buffers.
    """
    try:
        bufs = collect(chain)
    except ChainError as e:
        raise PacketError(f"bad chain: {e}") from None
    if bufs.writable.length:
        raise PacketError("TX chain has device-writable buffers")
    if bufs.readable.length < HDR_SIZE:
        raise PacketError(f"TX chain of {bufs.readable.length} bytes is shorter than the header")
    hdr = Header.unpack(bufs.readable.slice(0, HDR_SIZE).read(mem))
    payload = Segments()
    if hdr.op == VIRTIO_VSOCK_OP_RW:
        if hdr.len > MAX_PKT_PAYLOAD:
            raise PacketError(f"payload of {hdr.len} bytes exceeds {MAX_PKT_PAYLOAD}")
        if hdr.len > bufs.readable.length - HDR_SIZE:
            raise PacketError(f"header says {hdr.len} payload bytes, chain holds "
                              f"{bufs.readable.length - HDR_SIZE}")
        payload = bufs.readable.slice(HDR_SIZE, hdr.len)
    return TxPacket(chain.head, hdr, payload)
