"""Reading one transmitted packet out of a TX chain (§5.1.6.2); no I/O.

A TX chain is device-readable only: the 12-byte ``virtio_net_hdr_v1``
followed by the Ethernet frame, split over descriptors any way the driver
likes (Linux puts the header in its own descriptor or in front of the data).
:func:`parse_tx` checks that and returns a :class:`TxPacket` whose ``views``
are the whole packet, header included, as zero-copy windows on guest memory
ready for one ``writev`` into the tap (which takes the same header).  Only
the first bytes are copied out (:attr:`TxPacket.head`): enough to read the
header flags, the source MAC and whether the frame is for the MMDS.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.net.header import (ETH_ALEN, ETH_HLEN, MAX_BUFFER_SIZE,
                                                VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_SIZE)
from asyncvmm.memory import GuestMemory

# Header + the bytes the MMDS stack peeks at (up to the ARP target address, 42).
HEAD_BYTES = VNET_HDR_SIZE + ETH_HLEN + 28


class TxFrameError(Exception):
    """A TX chain that is not a packet the device can send."""


@dataclass(slots=True)
class TxPacket:
    head_index: int            # the chain's head descriptor, for the used ring
    views: list[memoryview]    # header + frame, in guest memory
    length: int                # bytes of the chain, header included (what the limiter charges)
    head: bytes                # the first HEAD_BYTES bytes (fewer for a short frame)

    @property
    def frame_length(self) -> int:
        return self.length - VNET_HDR_SIZE

    @property
    def needs_csum(self) -> bool:
        return bool(self.head[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def src_mac(self) -> bytes:
        start = VNET_HDR_SIZE + ETH_ALEN
        return self.head[start:start + ETH_ALEN]

    def frame(self) -> bytes:
        """The Ethernet frame without the virtio header (a copy)."""
        return b"".join(self.views)[VNET_HDR_SIZE:]


def parse_tx(mem: GuestMemory, chain: DescriptorChain) -> TxPacket:
    """Validate a TX chain; :class:`TxFrameError` says what is wrong with it."""
    try:
        bufs = collect(chain)
    except ChainError as e:
        raise TxFrameError(str(e)) from None
    if bufs.writable.length:
        raise TxFrameError("device-writable descriptor in a TX chain")
    n = bufs.readable.length
    if n < VNET_HDR_SIZE + ETH_HLEN:
        raise TxFrameError(f"TX chain of {n} bytes holds no Ethernet frame")
    if n > MAX_BUFFER_SIZE:
        raise TxFrameError(f"TX chain of {n} bytes exceeds {MAX_BUFFER_SIZE}")
    views = bufs.readable.views(mem)
    first = views[0]
    head = bytes(first[:HEAD_BYTES]) if len(first) >= HEAD_BYTES else b"".join(views)[:HEAD_BYTES]
    return TxPacket(chain.head, views, n, head)
