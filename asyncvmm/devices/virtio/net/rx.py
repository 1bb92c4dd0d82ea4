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

:class:`RxPath` is the receive side's decisions, sans-I/O: whether the guest
can take a frame now (:meth:`RxPath.ready`), and placing the *held* frame --
one frame taken in from the MMDS stack or the tap -- into its chains
(:meth:`RxPath.deliver`).  Each answers a :class:`RxState`; the handler does
the I/O the answer calls for (read the tap, arm the throttle timer, stop
reading).  Nothing here holds a file descriptor or touches the loop.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct

from asyncvmm.devices.rate_limiter import RateLimiter
from asyncvmm.devices.virtio.chain import MAX_CHAIN_BYTES, ChainError, collect
from asyncvmm.devices.virtio.net.header import (FLAGS_OFFSET, GSO_TYPE_OFFSET, NUM_BUFFERS_OFFSET,
                                                VIRTIO_NET_HDR_GSO_NONE, VNET_HDR_SIZE)
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE, VIRTQ_USED_ELEM_SIZE
from asyncvmm.memory import GuestMemory, GuestMemoryError, store_u16

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")      # struct virtq_used_elem { le32 id; le32 len; }
_DESC = struct.Struct("<QIHH")         # struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }


class Fit(enum.Enum):
    FITS = "fits"
    SHORT = "short"            # not enough chains yet: wait for the driver to add some
    TOO_LARGE = "too large"    # no amount of waiting makes this frame fit


class RxState(enum.Enum):
    READY = "ready"                # a frame can go in now (ready), or went in / was dropped (deliver)
    NO_BUFFERS = "no buffers"      # wait for the driver's RX kick; notifications are on
    THROTTLED = "throttled"        # wait for the RX limiter (arm its timer)


class RxBuffers:
    """The receive chains one activation holds, and how frames go into them."""

    def __init__(self, *, mergeable: bool, metrics: NetMetrics) -> None:
        self.mergeable = mergeable
        self.metrics = metrics
        # (head, [(gpa, len), ...] of its writable buffers, their total length)
        self._chains: collections.deque[tuple[int, list[tuple[int, int]], int]] = collections.deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._chains)

    @property
    def capacity(self) -> int:
        """Bytes the stock can take now (one chain's worth without MRG_RXBUF)."""
        if not self._chains:
            return 0
        return self._bytes if self.mergeable else self._chains[0][2]

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
            if not self._take(mem, queue, nbytes):
                return Fit.SHORT
        return fit

    def _take(self, mem: GuestMemory, queue: Queue, nbytes: int) -> bool:
        """Pop available chains into the stock until it holds ``nbytes`` (one chain without
        MRG_RXBUF), and every further one-descriptor chain the driver has made available;
        ``False`` if the ring was empty.

        Linux posts each receive buffer as one device-writable descriptor (a page or
        less with MRG_RXBUF), so a 64 KiB frame takes 16 or more of them: such a chain
        is read here straight from its descriptor, with the checks :func:`collect`
        makes for it.  Any other chain (several descriptors, indirect, a buffer above
        the low RAM that may span regions, a bad head) takes the general walk, and only
        while the stock still needs room.  Taking every simple chain at once lets the
        frames that follow go straight into the stock (:meth:`place_whole`) instead of
        each popping its own chain first.
        """
        pending = queue.pending(mem)
        if not pending:
            return False
        rings = queue.rings(mem)
        avail, desc, size = rings.avail, rings.desc, queue.size
        low_end, contains = mem.low_ram_end, mem.contains
        chains = self._chains
        want = nbytes - self._bytes if self.mergeable else 1
        for _ in range(pending):
            head = _U16.unpack_from(avail, 4 + 2 * (queue.next_avail % size))[0]
            if head < size:
                addr, length, flags, _ = _DESC.unpack_from(desc, head * VIRTQ_DESC_SIZE)
                if (flags == VIRTQ_DESC_F_WRITE and VNET_HDR_SIZE <= length <= MAX_CHAIN_BYTES
                        and (addr + length <= low_end or contains(addr, length))):
                    queue.next_avail = (queue.next_avail + 1) & 0xFFFF
                    chains.append((head, [(addr, length)], length))
                    self._bytes += length
                    want -= length
                    continue
            if want > 0:
                self._take_walked(mem, queue)
            break                           # the caller checks the fit again
        return True

    def _take_walked(self, mem: GuestMemory, queue: Queue) -> None:
        chain = queue.pop(mem)
        assert chain is not None            # pending said so
        try:
            bufs = collect(chain)
        except ChainError:
            self._unusable(mem, queue, chain.head)
            return
        if bufs.readable.length or bufs.writable.length < VNET_HDR_SIZE:
            self._unusable(mem, queue, chain.head)
            return
        self._chains.append((chain.head, bufs.writable.parts, bufs.writable.length))
        self._bytes += bufs.writable.length

    @property
    def held_chains(self) -> int:
        """Chains popped for the stock and not used yet."""
        return len(self._chains)

    def _unusable(self, mem: GuestMemory, queue: Queue, head: int) -> None:
        self.metrics.rx_fails += 1
        queue.add_used(mem, head, 0)

    def _chains_for(self, nbytes: int) -> int:
        count = room = 0
        for _, _, length in self._chains:
            count += 1
            room += length
            if room >= nbytes:
                break
        return count

    def place_whole(self, mem: GuestMemory, queue: Queue, frame: memoryview) -> bool:
        """Copy ``frame`` into the first buffer of the first chain if it fits there whole.

        The usual small frame: one chain, one copy, one used element, none of
        :meth:`reserve`'s and :meth:`commit`'s walks.  ``False`` (and nothing
        done): the stock is empty or the frame needs more room; :meth:`reserve`
        and :meth:`commit` decide.  ``num_buffers`` is filled in as commit does.
        """
        chains = self._chains
        if not chains:
            return False
        head, parts, length = chains[0]
        addr, room = parts[0]
        total = len(frame)
        if total > room:
            return False
        _U16.pack_into(frame, NUM_BUFFERS_OFFSET, 1)
        chains.popleft()
        self._bytes -= length
        _write(mem, addr, frame)
        queue.add_used(mem, head, total)
        return True

    def commit(self, mem: GuestMemory, queue: Queue, frame: bytearray | memoryview) -> int:
        """Copy ``frame`` (after :meth:`reserve` said FITS) into the stock; chains used.

        ``frame`` is the header and the frame in a writable buffer: its
        ``num_buffers`` is filled in here before the copy.
        """
        data = memoryview(frame)
        total = len(data)
        count = self._chains_for(total)
        _U16.pack_into(data, NUM_BUFFERS_OFFSET, count)
        offset = 0
        elems = []
        popleft = self._chains.popleft
        for _ in range(count):
            head, parts, length = popleft()
            self._bytes -= length
            start = offset
            for addr, n in parts:
                if offset == total:
                    break
                piece = data[offset:offset + n]
                _write(mem, addr, piece)
                offset += len(piece)
            elems.append((head, offset - start))
        add_used_together(mem, queue, elems)
        return count


class RxPath:
    """Receiving for one activation: the held frame, the stock of chains, the limiter.  No I/O."""

    def __init__(self, queue: Queue, limiter: RateLimiter, metrics: NetMetrics, *,
                 mergeable: bool, guest_csum: bool, guest_gso: bool) -> None:
        self.queue = queue
        self.limiter = limiter
        self.metrics = metrics
        self.guest_csum = guest_csum
        self.guest_gso = guest_gso
        self.buffers = RxBuffers(mergeable=mergeable, metrics=metrics)
        self.held: memoryview | None = None       # a frame taken in, waiting for room or tokens
        self.waiting_for_buffers = False

    def ready(self, mem: GuestMemory, receiving: bool) -> RxState:
        """May the next frame be taken in?  ``receiving``: frames were flowing (count a stall)."""
        if self._reserve(mem, 1, count_wait=receiving) is None:
            return RxState.NO_BUFFERS
        if self.limiter.is_blocked():
            return RxState.THROTTLED
        return RxState.READY

    def can_take(self) -> bool:
        """What :meth:`ready` would answer READY to, without its walk: a chain in the stock
        and no limiter."""
        return bool(self.buffers._chains) and not self.limiter.enabled

    def place(self, mem: GuestMemory, frame: memoryview) -> bool:
        """Deliver ``frame`` (header included, writable) at once if nothing has to be decided:
        no limiter, no offload the guest did not negotiate, room in the first buffer of the
        stock.  ``False``: nothing done; :meth:`hold` it and let :meth:`deliver` decide."""
        if self.limiter.enabled or (frame[GSO_TYPE_OFFSET] != VIRTIO_NET_HDR_GSO_NONE and not self.guest_gso):
            return False
        flags = frame[FLAGS_OFFSET]
        if not self.guest_csum:
            frame[FLAGS_OFFSET] = 0   # §5.1.6.4, as deliver() does
        if not self.buffers.place_whole(mem, self.queue, frame):
            frame[FLAGS_OFFSET] = flags
            return False
        self.waiting_for_buffers = False
        metrics = self.metrics
        metrics.rx_packets_count += 1
        metrics.rx_bytes_count += len(frame) - VNET_HDR_SIZE
        return True

    def hold(self, frame: memoryview) -> None:
        """Take ``frame`` (virtio header included, writable) for the guest."""
        self.held = frame

    def deliver(self, mem: GuestMemory) -> RxState:
        """Put the held frame into the guest's chains, or drop it if it can never fit.

        READY: the frame is gone (delivered or dropped); otherwise it stays held.
        """
        frame = self.held
        assert frame is not None
        fit = self._reserve(mem, len(frame), count_wait=True)
        if fit is None:
            return RxState.NO_BUFFERS
        if fit is Fit.TOO_LARGE or (frame[GSO_TYPE_OFFSET] != VIRTIO_NET_HDR_GSO_NONE
                                    and not self.guest_gso):
            # Too large for the guest's buffers, or a GSO frame the tap queued
            # before a reset renegotiated offloads: the guest cannot take it.
            log.debug("net: dropped a %d-byte frame the guest cannot receive", len(frame))
            self.metrics.rx_fails += 1
            self.held = None
            return RxState.READY
        if self.limiter.enabled and not self.limiter.consume_request(len(frame)):
            self.metrics.rx_rate_limiter_throttled += 1
            return RxState.THROTTLED
        if not self.guest_csum:
            frame[FLAGS_OFFSET] = 0   # §5.1.6.4: no checksum flags for a driver that cannot take them
        self.buffers.commit(mem, self.queue, frame)
        self.metrics.rx_packets_count += 1
        self.metrics.rx_bytes_count += len(frame) - VNET_HDR_SIZE
        self.held = None
        return RxState.READY

    def _reserve(self, mem: GuestMemory, nbytes: int, *, count_wait: bool) -> Fit | None:
        """FITS or TOO_LARGE for ``nbytes``; ``None``: short, and notifications are on."""
        while (fit := self.buffers.reserve(mem, self.queue, nbytes)) is Fit.SHORT:
            if not self.queue.enable_notification(mem):
                if count_wait and not self.waiting_for_buffers:
                    # Receiving waits for the guest's buffers (counted once per wait).
                    self.waiting_for_buffers = True
                    self.metrics.no_rx_avail_buffer += 1
                return None
        self.waiting_for_buffers = False
        return fit


def _write(mem: GuestMemory, addr: int, data: memoryview) -> None:
    try:
        mem.write(addr, data)
    except GuestMemoryError:         # a buffer over adjacent regions (collect allowed it)
        done = 0
        for view in mem.views(addr, len(data)):
            view[:] = data[done:done + len(view)]
            done += len(view)


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
