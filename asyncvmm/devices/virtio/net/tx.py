"""Reading one transmitted packet out of a TX chain (§5.1.6.2); no I/O.

A TX chain is device-readable only: the 12-byte ``virtio_net_hdr_v1``
followed by the Ethernet frame, split over descriptors any way the driver
likes (Linux puts the header in its own descriptor or in front of the data).
:func:`parse_tx` checks that and returns a :class:`TxPacket` whose ``views``
are the whole packet, header included, as zero-copy windows on guest memory
ready for one ``writev`` into the tap (which takes the same header).  Only
the first bytes are copied out (:attr:`TxPacket.head`): enough to read the
header flags, the source MAC and whether the frame is for the MMDS.

:class:`TxPath` is the transmit side's decisions (§5.1.6.2), sans-I/O: for
each chain it returns the effects (:class:`WriteTap`, :class:`ToMmds`,
:class:`Throttled`, :class:`~asyncvmm.devices.virtio.handler.Used`) that the
handler carries out, and it is told how a tap write went
(:meth:`TxPath.sent`, :meth:`TxPath.write_failed`, :meth:`TxPath.would_block`)
so the counters and the limiter follow what really happened.  It holds no
file descriptor and never touches the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from asyncvmm.devices.rate_limiter import RateLimiter, TokenType
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.handler import Effect, Used
from asyncvmm.devices.virtio.net.header import (ETH_ALEN, ETH_HLEN, MAX_BUFFER_SIZE,
                                                VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_SIZE)
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.memory import GuestMemory

log = logging.getLogger(__name__)

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


# -- effects and decisions ---------------------------------------------------

@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~1 us per chain
class WriteTap(Effect):
    """Write the packet (header + frame, straight from guest memory) to the tap in one writev."""

    pkt: TxPacket


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~1 us per chain
class ToMmds(Effect):
    """Offer the frame to the MMDS stack; a frame the stack declines goes to the tap instead."""

    pkt: TxPacket


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~1 us per chain
class Throttled(Effect):
    """The TX limiter refused the chain: arm its throttle timer and stall the queue."""


class TxPath:
    """What to do with each transmitted chain; counts what happened.  No I/O.

    ``is_mmds_frame`` peeks at a frame (without the virtio header) and says
    whether the MMDS stack should see it (``None``: no MMDS on this device).
    ``guest_mac`` answers the MAC the guest was configured with, now (``None``:
    none configured), against which source addresses count as spoofed.
    """

    def __init__(self, queue: Queue, limiter: RateLimiter, metrics: NetMetrics, *,
                 is_mmds_frame: Callable[[bytes], bool] | None,
                 guest_mac: Callable[[], bytes | None]) -> None:
        self.queue = queue
        self.limiter = limiter
        self.metrics = metrics
        self.is_mmds_frame = is_mmds_frame
        self.guest_mac = guest_mac

    def chain(self, mem: GuestMemory, chain: DescriptorChain) -> list[Effect]:
        try:
            pkt = parse_tx(mem, chain)
        except TxFrameError as e:
            log.debug("net: dropped a TX chain: %s", e)
            self.metrics.tx_malformed_frames += 1
            self.metrics.tx_fails += 1
            return [Used(chain.head, 0)]
        if self.limiter.enabled and not self.limiter.consume_request(pkt.length):
            self.metrics.tx_rate_limiter_throttled += 1
            # The refused chain is popped but not yet put back, hence the +1.
            self.metrics.tx_remaining_reqs_count += self.queue.pending(mem) + 1
            return [Throttled()]
        mac = self.guest_mac()
        if mac is not None and pkt.src_mac != mac:
            self.metrics.tx_spoofed_mac_count += 1
        if self.is_mmds_frame is not None and self.is_mmds_frame(pkt.head[VNET_HDR_SIZE:]):
            return [ToMmds(pkt), Used(pkt.head_index, 0)]
        return [WriteTap(pkt), Used(pkt.head_index, 0)]

    def sent(self, pkt: TxPacket, *, to_tap: bool) -> None:
        """The frame left: written to the tap, or taken by the MMDS stack."""
        if to_tap:
            self.metrics.tx_count += 1
        self.metrics.tx_packets_count += 1
        self.metrics.tx_bytes_count += pkt.frame_length

    def write_failed(self, pkt: TxPacket) -> None:
        """The tap refused the frame for good: it is dropped (used length 0, as for any frame)."""
        self.metrics.tap_write_fails += 1
        self.metrics.tx_fails += 1

    def would_block(self, pkt: TxPacket) -> None:
        """The tap is full: the chain goes back, and so do the tokens it was charged."""
        if self.limiter.enabled:
            self.limiter.refund(1, TokenType.OPS)
            self.limiter.refund(pkt.length, TokenType.BYTES)
