"""The host memory behind the hotpluggable region: one anonymous mapping, KVM slots on demand.

The region is mapped once, private, anonymous and ``MAP_NORESERVE``, as
boot RAM is (:meth:`asyncvmm.memory.GuestMemory.anonymous`): nothing is
reserved or resident until the guest touches a plugged block.  Slot ``i``
(``slot_size`` bytes at ``addr + i * slot_size``) becomes a KVM memory slot
when its first block is plugged and stops being one when its last block is
unplugged, through ``set_region(index, guest_addr, size, host_addr)`` (the
builder's ``KVM_SET_USER_MEMORY_REGION``; ``size`` 0 deletes the slot), so
a guest access to memory no plugged block covers faults in KVM instead of
reaching host RAM.  :meth:`release` gives unplugged blocks' host memory back
with ``MADV_DONTNEED``: the VMM's RSS drops, and the next plug of those
blocks reads zeros.  No KVM import here: the builder hands ``set_region`` in.
"""

from __future__ import annotations

import mmap
from typing import Callable

from asyncvmm.memory import MAP_NORESERVE, GuestRegion


class HotplugBacking:
    def __init__(self, addr: int, size: int, slot_size: int,
                 set_region: Callable[[int, int, int, int], None]) -> None:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self.region = GuestRegion(addr, buf, anonymous=True)
        self.slot_size = slot_size
        self._set_region = set_region
        self._host_addr = self.region.host_addr

    def set_slot(self, index: int, present: bool) -> None:
        offset = index * self.slot_size
        self._set_region(index, self.region.guest_addr + offset, self.slot_size if present else 0,
                         self._host_addr + offset)

    def release(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.region.size:
            raise ValueError(f"release {offset:#x}+{length:#x} outside the region")
        self.region.buffer.madvise(mmap.MADV_DONTNEED, offset, length)

    def close(self) -> None:
        self.region.close()
