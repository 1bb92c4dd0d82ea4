"""The split virtqueue (§2.7), as plain state over guest memory passed in.

Primer.  A split virtqueue of ``size`` entries is three guest areas the driver
allocates and the device only addresses:

* the descriptor table (16 bytes per entry, 16-byte aligned, §2.7.5);
* the available ring ``{le16 flags; le16 idx; le16 ring[size]; le16 used_event}``
  (2-byte aligned, §2.7.6): the driver writes chain heads, then bumps ``idx``;
* the used ring ``{le16 flags; le16 idx; {le32 id; le32 len} ring[size];
  le16 avail_event}`` (4-byte aligned, §2.7.8): the device writes heads back.

Indices are free-running 16-bit counters; ``idx % size`` is the slot.  With
``VIRTIO_F_EVENT_IDX`` (§2.7.7, §2.7.10) each side publishes the index at
which it next wants to hear from the other (``used_event``, ``avail_event``)
and ``vring_need_event`` decides whether a notification is due.

:class:`Queue` holds only ints and bools (so a snapshot is a dict of numbers)
and every method takes the guest memory.  A driver that breaks the ring
protocol gets :class:`QueueContractError`, which the device answers with
DEVICE_NEEDS_RESET (§2.1.2); a bad configuration at activation gets
:class:`QueueConfigError`.  No I/O here.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple

from asyncvmm.devices.virtio.chain import DescriptorChain
from asyncvmm.devices.virtio.spec import (
    VIRTQ_AVAIL_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_ALIGN,
    VIRTQ_DESC_SIZE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_ALIGN,
    VIRTQ_USED_ELEM_SIZE,
)
from asyncvmm.memory import GuestMemory, GuestMemoryError, store_u16


_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")      # struct virtq_used_elem { le32 id; le32 len; }


class QueueConfigError(Exception):
    """The driver configured a queue the device cannot use (size, address, alignment)."""


class QueueContractError(Exception):
    """The driver broke the ring protocol at run time (§2.1.2: the device needs a reset)."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.7: whether moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx``.

    All arithmetic is modulo 2**16, like the rings' own indices.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


_fence = threading.Lock()


def full_memory_barrier() -> None:
    """Order our earlier guest-memory stores before our later loads.

    x86 is TSO: stores stay in order and loads stay in order, which is all
    the ring needs except in one place.  Notification suppression is a
    Dekker pattern (we store an index, then load the driver's; the driver
    stores its index, then loads ours) and TSO lets a load pass an earlier
    store still sitting in the store buffer.  Taking and releasing a lock
    runs a ``lock``-prefixed instruction (glibc's semaphore CAS under
    CPython's lock), which drains the store buffer: a full fence.
    """
    with _fence:
        pass


class _Rings(NamedTuple):
    """Views of one queue's three areas, taken once through GuestMemory.view."""

    key: tuple
    desc: memoryview
    avail: memoryview
    used: memoryview
    # With dirty page tracking: marks the used ring written (GuestMemory.marker), else None.
    mark_used: Callable[[], None] | None = None
    # The used ring's idx as a one-element u16 view: ``used_idx[0] = n`` is one machine
    # store (memory.store_u16), without building two views per used buffer.
    used_idx: memoryview | None = None


@dataclass
class Queue:
    """One split virtqueue's configuration and the device's position in it."""

    max_size: int
    size: int                  # QueueNum: the driver's choice, validated at activation
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    # Negotiated ring features.
    event_idx: bool = False
    indirect_desc: bool = False
    # The device's state: next avail slot to read, next used slot to write,
    # used index at the last notification decision, last avail idx seen.
    next_avail: int = 0
    next_used: int = 0
    signalled_used: int = 0
    avail_idx_seen: int = 0
    # Not state: a cache of views derived from the fields above and the memory.
    _rings: _Rings | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.max_size <= VIRTQ_MAX_SIZE or self.max_size & (self.max_size - 1):
            raise ValueError(f"queue max size {self.max_size} is not a power of two <= {VIRTQ_MAX_SIZE}")

    def state(self) -> dict[str, int | bool]:
        """The queue as plain numbers (for snapshots); the view cache is not state."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    # -- activation ---------------------------------------------------------

    def _areas(self) -> tuple[tuple[str, int, int, int], ...]:
        size = self.size
        tail = 2 if self.event_idx else 0       # used_event / avail_event exist with EVENT_IDX
        return (
            ("descriptor table", self.desc_table, VIRTQ_DESC_SIZE * size, VIRTQ_DESC_ALIGN),
            ("available ring", self.avail_ring, 4 + 2 * size + tail, VIRTQ_AVAIL_ALIGN),
            ("used ring", self.used_ring, 4 + VIRTQ_USED_ELEM_SIZE * size + tail, VIRTQ_USED_ALIGN),
        )

    def validate(self, mem: GuestMemory) -> None:
        """Check the driver's configuration against §2.7 before the queue goes live."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueConfigError(f"queue size {size} is not a power of two <= {self.max_size}")
        for name, addr, length, align in self._areas():
            if addr % align:
                raise QueueConfigError(f"{name} at {addr:#x} is not {align}-byte aligned")
            # One region each, so each area is one bounds-checked view.
            if not mem.contains(addr, length):
                raise QueueConfigError(f"{name} at {addr:#x}+{length:#x} is not in guest memory")

    def rings(self, mem: GuestMemory) -> _Rings:
        """Views of the three areas, taken once per configuration and memory.

        Field offsets below stay inside these views because every slot is
        ``idx % size``; a queue that was not validated fails here instead.
        """
        key = (mem, self.size, self.desc_table, self.avail_ring, self.used_ring, self.event_idx,
               mem.tracking_dirty)
        rings = self._rings
        if rings is None or rings.key != key:
            try:
                desc, avail, used = (mem.view(addr, n) for _, addr, n, _ in self._areas())
            except GuestMemoryError as e:
                raise QueueContractError(f"queue areas not in guest memory: {e}") from None
            _, used_addr, used_len, _ = self._areas()[2]
            rings = self._rings = _Rings(key, desc, avail, used, mem.marker(used_addr, used_len),
                                         used[2:4].cast("H"))
        return rings

    # -- the available side -------------------------------------------------

    def pending(self, mem: GuestMemory) -> int:
        """Chains the driver has made available and the device has not popped."""
        return self._pending(self.rings(mem))

    def _pending(self, rings: _Rings) -> int:
        idx = _U16.unpack_from(rings.avail, 2)[0]
        count = (idx - self.next_avail) & 0xFFFF
        if count > self.size:
            # §2.1.2 / §2.7.13: the driver can have at most `size` chains outstanding.
            raise QueueContractError(f"avail idx {idx} is {count} ahead of {self.next_avail}, queue size {self.size}")
        self.avail_idx_seen = idx
        return count

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the driver has offered nothing new."""
        rings = self.rings(mem)
        head = self.pop_head(rings)
        if head is None:
            return None
        return DescriptorChain(mem, rings.desc, head, indirect_ok=self.indirect_desc)

    def pop_head(self, rings: _Rings) -> int | None:
        """:meth:`pop` as the chain's head index in ``rings.desc`` (``rings`` is :meth:`rings`),
        for a device that reads the usual chain straight from the table."""
        if self.avail_idx_seen == self.next_avail and self._pending(rings) == 0:
            return None
        # Loads are not reordered with loads on x86, so the ring slot read here
        # is at least as new as the idx read that announced it.
        slot = self.next_avail % self.size
        head = _U16.unpack_from(rings.avail, 4 + 2 * slot)[0]
        if head >= self.size:
            raise QueueContractError(f"avail ring slot {slot} names descriptor {head}, queue size {self.size}")
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return head

    def chain_at(self, mem: GuestMemory, rings: _Rings, head: int) -> DescriptorChain:
        """The chain :meth:`pop_head` answered ``head`` for, to walk."""
        return DescriptorChain(mem, rings.desc, head, indirect_ok=self.indirect_desc)

    def undo_pop(self) -> None:
        """Give the last popped chain back (e.g. the rate limiter refused it)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask for a kick on the next new chain; ``True`` if one already arrived.

        Without EVENT_IDX the device never sets VIRTQ_USED_F_NO_NOTIFY, so
        there is nothing to re-enable.  With it, avail_event tells the driver
        to notify when it makes slot ``next_avail`` available (§2.7.10).
        """
        if not self.event_idx:
            return self.pending(mem) > 0
        rings = self.rings(mem)
        store_u16(rings.used, 4 + VIRTQ_USED_ELEM_SIZE * self.size, self.next_avail)
        if rings.mark_used is not None:
            rings.mark_used()
        # Dekker: our avail_event store must be visible before we re-read avail idx,
        # or a chain added in between is neither seen now nor kicked later.
        full_memory_barrier()
        return self._pending(rings) > 0

    # -- the used side ------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written into it."""
        rings = self.rings(mem)
        used = rings.used
        if rings.mark_used is not None:
            rings.mark_used()
        _USED_ELEM.pack_into(used, 4 + VIRTQ_USED_ELEM_SIZE * (self.next_used % self.size), head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps stores in order and the GIL keeps ours in program order, so
        # the driver, which reads idx and then the element, never sees the new
        # idx before the element it covers.  One store through a u16 view (as
        # store_u16 does): the driver polls idx, and struct.pack_into would
        # briefly show it 0.
        rings.used_idx[0] = self.next_used

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the used entries added since the last call deserve an interrupt."""
        old, new = self.signalled_used, self.next_used
        self.signalled_used = new
        if old == new:
            return False
        # Dekker again: the used idx store must be visible before we read the
        # driver's suppression state, which it writes before re-reading used idx.
        full_memory_barrier()
        avail = self.rings(mem).avail
        if self.event_idx:
            used_event = _U16.unpack_from(avail, 4 + 2 * self.size)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
