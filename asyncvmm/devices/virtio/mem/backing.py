"""The host memory behind the hotpluggable region: one mapping, KVM slots on demand.

The region is mapped once, private and ``MAP_NORESERVE``, as boot RAM is
(:meth:`asyncvmm.memory.GuestMemory.anonymous`): anonymous for a booted
microVM, the snapshot's memory file (copy-on-write) for a restored one.
Nothing is reserved or resident until the guest touches a plugged block.
Slot ``i`` (``slot_size`` bytes at ``addr + i * slot_size``) becomes a KVM
memory slot when its first block is plugged and stops being one when its
last block is unplugged, through ``set_region(index, guest_addr, size,
host_addr)`` (the builder's ``KVM_SET_USER_MEMORY_REGION``; ``size`` 0
deletes the slot), so a guest access to memory no plugged block covers
faults in KVM instead of reaching host RAM.

:meth:`release` gives unplugged blocks' host memory back: ``MADV_DONTNEED``
on anonymous memory (the VMM's RSS drops, a later plug reads zeros); on a
file mapping that would bring the file's pages back, so fresh anonymous
pages are mapped over the range instead (``MAP_FIXED``: same addresses,
which KVM follows through its MMU notifier).  :meth:`write_file` puts the
plugged blocks into a snapshot's memory file, zero chunks left as holes.
No KVM import here: the builder hands ``set_region`` in.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Callable

from asyncvmm.memory import MAP_NORESERVE, GuestRegion

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
MAP_FIXED = 0x10
CHUNK = 1 << 16
_ZERO = bytes(CHUNK)


class HotplugBacking:
    def __init__(self, addr: int, size: int, slot_size: int,
                 set_region: Callable[[int, int, int, int], None], *,
                 file: tuple[int, int] | None = None) -> None:
        """``file``: ``(fd, offset)`` of the region's contents in a snapshot's memory file."""
        if file is None:
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        else:
            buf = mmap.mmap(file[0], size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, offset=file[1])
        self.region = GuestRegion(addr, buf, anonymous=file is None)
        self.file_backed = file is not None
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
        if not self.file_backed:
            self.region.buffer.madvise(mmap.MADV_DONTNEED, offset, length)
            return
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
        out = _libc.mmap(self._host_addr + offset, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if out != self._host_addr + offset:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def write_file(self, path: str, file_offset: int, runs: list[tuple[int, int]], block_size: int) -> None:
        """Write the blocks of ``runs`` (first block, count) at ``file_offset`` of ``path`` and
        extend the file over the whole region; unplugged blocks and zero chunks stay holes."""
        view = self.region.view
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for first, count in runs:
                for start in range(first * block_size, (first + count) * block_size, CHUNK):
                    piece = view[start:start + CHUNK]
                    if piece != _ZERO[:len(piece)]:
                        written = 0
                        while written < len(piece):
                            written += os.pwrite(fd, piece[written:], file_offset + start + written)
            os.ftruncate(fd, file_offset + self.region.size)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.region.close()
