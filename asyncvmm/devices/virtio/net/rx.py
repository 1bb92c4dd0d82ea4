"""Placing received frames into the guest's receive chains (§5.1.6.3, §5.1.6.4); no I/O.

The device keeps a small *stock* of receive chains it has popped from the
RX queue but not yet returned.  For each frame (virtio header included) it
asks :meth:`RxBuffers.reserve` whether the stock can take it, popping more
chains as needed, and then :meth:`RxBuffers.commit` copies the frame in and
adds the used elements.  Chains stay in the stock across frames, so a
reservation never has to be undone and the avail index never moves back.

* Without VIRTIO_NET_F_MRG_RXBUF a frame goes into one chain (the first of
  the stock) and ``num_buffers`` is 1.  A frame larger than that chain is
  :attr:`Fit.TOO_LARGE`: the driver sized its buffers for smaller frames.
* With it, a frame fills chains in order, each used element saying how much
  of that chain it took, and ``num_buffers`` in the header (which lies in the
  first chain) says how many.  The elements of one frame are added to the
  used ring back to back, as the driver reads them.  A frame that would need
  more chains than the ring holds is :attr:`Fit.TOO_LARGE`.  The used index
  moves once per frame (:func:`add_used_together`).
* :attr:`Fit.SHORT`: the ring ran dry first; the frame waits for more.

A chain the device cannot write a frame into (a ChainError, a device-readable
descriptor, room for less than the header) is returned at once with used
length 0 and counted in ``rx_fails``; Linux drops such a buffer as a short
packet.  A broken ring (QueueContractError) propagates to the handler, which
sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import collections
import enum
import struct

from asyncvmm.devices.virtio.chain import ChainError, Segments, collect
from asyncvmm.devices.virtio.net.header import NUM_BUFFERS_OFFSET, VNET_HDR_SIZE
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import VIRTQ_USED_ELEM_SIZE
from asyncvmm.memory import GuestMemory, store_u16

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")      # struct virtq_used_elem { le32 id; le32 len; }


class Fit(enum.Enum):
    FITS = "fits"
    SHORT = "short"            # not enough chains yet: wait for the driver to add some
    TOO_LARGE = "too large"    # no amount of waiting makes this frame fit


class RxBuffers:
    """The receive chains one activation holds, and how frames go into them."""

    def __init__(self, *, mergeable: bool, metrics: NetMetrics) -> None:
        self.mergeable = mergeable
        self.metrics = metrics
        self._chains: collections.deque[tuple[int, Segments]] = collections.deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._chains)

    @property
    def capacity(self) -> int:
        """Bytes the stock can take now (one chain's worth without MRG_RXBUF)."""
        if not self._chains:
            return 0
        return self._bytes if self.mergeable else self._chains[0][1].length

    def _fit(self, nbytes: int, queue: Queue) -> Fit | None:
        if not self._chains:
            return None
        if self.capacity >= nbytes:
            return Fit.FITS
        if not self.mergeable or len(self._chains) >= queue.size:
            return Fit.TOO_LARGE
        return None

    def reserve(self, mem: GuestMemory, queue: Queue, nbytes: int) -> Fit:
        """Pop chains until a frame of ``nbytes`` (header included) fits, or say why not."""
        while (fit := self._fit(nbytes, queue)) is None:
            chain = queue.pop(mem)
            if chain is None:
                return Fit.SHORT
            try:
                bufs = collect(chain)
            except ChainError:
                self._unusable(mem, queue, chain.head)
                continue
            if bufs.readable.length or bufs.writable.length < VNET_HDR_SIZE:
                self._unusable(mem, queue, chain.head)
                continue
            self._chains.append((chain.head, bufs.writable))
            self._bytes += bufs.writable.length
        return fit

    def _unusable(self, mem: GuestMemory, queue: Queue, head: int) -> None:
        self.metrics.rx_fails += 1
        queue.add_used(mem, head, 0)

    def _chains_for(self, nbytes: int) -> int:
        count = room = 0
        for _, segs in self._chains:
            count += 1
            room += segs.length
            if room >= nbytes:
                break
        return count

    def commit(self, mem: GuestMemory, queue: Queue, frame: bytearray | memoryview) -> int:
        """Copy ``frame`` (after :meth:`reserve` said FITS) into the stock; chains used.

        ``frame`` is the header and the frame in a writable buffer: its
        ``num_buffers`` is filled in here before the copy.
        """
        data = memoryview(frame)
        count = self._chains_for(len(data))
        _U16.pack_into(data, NUM_BUFFERS_OFFSET, count)
        offset = 0
        elems = []
        for _ in range(count):
            head, segs = self._chains.popleft()
            self._bytes -= segs.length
            take = min(segs.length, len(data) - offset)
            segs.write(mem, data[offset:offset + take])
            elems.append((head, take))
            offset += take
        add_used_together(mem, queue, elems)
        return count


def add_used_together(mem: GuestMemory, queue: Queue, elems: list[tuple[int, int]]) -> None:
    """Add used elements and publish them with one used-idx store.

    Linux reads a merged packet's ``num_buffers`` elements back to back and
    drops the packet ("buffers missing") if one is not there yet, so the
    driver must never see the idx cover only part of a packet.
    :meth:`Queue.add_used` publishes after every element; this writes the
    same ring fields (§2.7.8) and bumps idx once, at the end.
    """
    if len(elems) == 1:
        queue.add_used(mem, *elems[0])
        return
    used = queue.rings(mem).used
    for head, length in elems:
        _USED_ELEM.pack_into(used, 4 + VIRTQ_USED_ELEM_SIZE * (queue.next_used % queue.size), head, length)
        queue.next_used = (queue.next_used + 1) & 0xFFFF
    # x86 keeps these stores in order: the elements are visible before the idx.
    store_u16(used, 2, queue.next_used)
