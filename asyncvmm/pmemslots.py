"""virtio-pmem's host side: a file mapped into guest-physical memory as its own KVM slot.

Each device's file is mapped ``MAP_SHARED`` (``PROT_READ`` only for a
read-only device) and given to KVM as one memory slot, ``KVM_MEM_READONLY``
for a read-only device (a guest write to it then exits as MMIO and is
dropped, counted as an unclaimed MMIO access).  The guest-physical region
starts and ends on 2 MiB boundaries (:data:`layout.PMEM_ALIGN`): a file whose
length is not a multiple of 2 MiB is followed, up to the boundary, by private
anonymous pages that are never written back (docs/pmem.md says so).

:class:`PmemRegions` places the regions first fit in the window past the
64-bit PCI window (:func:`layout.pmem_window`), as Firecracker does (its lower
half: virtio-mem's hotpluggable memory takes the upper one), and
takes KVM slot numbers from the top of KVM's range downwards, so they never
meet the RAM slots counted from 0.  A flush is ``msync(MS_SYNC)`` over the
file's pages (:meth:`PmemBacking.flush`); it runs on a worker thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from .arch.x86_64 import layout
from .kvm import VmFd
from .kvm.ioctls import KVM_CAP_NR_MEMSLOTS
from .kvm.structs import KVM_MEM_READONLY

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MS_SYNC = 4

# KVM_CAP_NR_MEMSLOTS may answer 0 on old kernels; 509 was x86's number for years.
_DEFAULT_NR_MEMSLOTS = 509


def nr_memslots(vm: VmFd) -> int:
    """How many memory slots this VM's KVM offers (its RAM, hotplug, pmem and register-page
    slots are all numbered within it)."""
    return vm.check_extension(KVM_CAP_NR_MEMSLOTS) or _DEFAULT_NR_MEMSLOTS


class PmemError(Exception):
    """The device cannot be created; the message is Firecracker's ``PmemError`` text."""


def os_error_text(err: OSError) -> str:
    return f"{os.strerror(err.errno)} (os error {err.errno})" if err.errno else str(err)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, 0)
    if out is None or out == MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return out


class PmemBacking:
    """The file of one device, mapped: ``host_addr`` for ``mmap_len`` bytes (2 MiB aligned)."""

    def __init__(self, path: str, read_only: bool) -> None:
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise PmemError(f"Error accessing backing file: {os_error_text(e)}") from None
        try:
            self.file_len = os.fstat(fd).st_size
            if self.file_len == 0:
                raise PmemError("Error backing file size is 0")
            self.mmap_len = align_up(self.file_len, layout.PMEM_ALIGN)
            prot = mmap.PROT_READ | (0 if read_only else mmap.PROT_WRITE)
            shared = mmap.MAP_SHARED | MAP_NORESERVE
            try:
                if self.mmap_len == self.file_len:
                    self.host_addr = _mmap(None, self.file_len, prot, shared, fd)
                else:
                    # Reserve the aligned length with private anonymous pages, then put the
                    # file over its start: the tail up to 2 MiB stays anonymous.
                    self.host_addr = _mmap(None, self.mmap_len, prot, mmap.MAP_PRIVATE
                                           | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1)
                    try:
                        _mmap(self.host_addr, self.file_len, prot, shared | MAP_FIXED, fd)
                    except OSError:
                        _libc.munmap(self.host_addr, self.mmap_len)
                        raise
            except OSError as e:
                raise PmemError(f"Error accessing backing file: {os_error_text(e)}") from None
        finally:
            os.close(fd)          # the mapping keeps the file
        self.read_only = read_only

    def flush(self) -> bool:
        """msync(MS_SYNC) over the file's pages; whether it succeeded.  Any thread."""
        if self.host_addr is None:
            return False
        return _libc.msync(self.host_addr, self.file_len, MS_SYNC) == 0

    def close(self) -> None:
        if self.host_addr is not None:
            _libc.munmap(self.host_addr, self.mmap_len)
            self.host_addr = None


class PmemRegions:
    """Guest-physical placement and KVM slots of one microVM's pmem regions."""

    def __init__(self, vm: VmFd, ram_end: int) -> None:
        self._vm = vm
        base, size = layout.pmem_window(ram_end)
        # The upper half of the window is the hotpluggable memory's (layout.memory_hotplug_region).
        self.window = (base, size // 2)
        self._regions: dict[int, int] = {}        # start -> size
        nr = nr_memslots(vm)
        self._top_slot = nr - 1
        self._slots: dict[int, int] = {}          # start -> KVM slot

    def allocate(self, size: int) -> int:
        """The lowest 2 MiB-aligned start in the window where ``size`` bytes fit."""
        base, window_size = self.window
        candidate = base
        for start, length in sorted(self._regions.items()):
            if candidate + size <= start:
                break
            candidate = max(candidate, align_up(start + length, layout.PMEM_ALIGN))
        if candidate + size > base + window_size:
            raise PmemError("Failed to allocate memory region")
        return candidate

    def check(self, start: int, size: int) -> None:
        """A saved placement (snapshot): aligned, inside the window, over no other region."""
        base, window_size = self.window
        if (start % layout.PMEM_ALIGN or size % layout.PMEM_ALIGN or start < base
                or start + size > base + window_size
                or any(start < s + n and s < start + size for s, n in self._regions.items())):
            raise PmemError(f"Failed to allocate memory region: [{start:#x}, {start + size:#x}) "
                            f"is not a free, 2 MiB aligned part of the pmem window")

    def map(self, backing: PmemBacking, start: int) -> None:
        """Give ``backing``'s pages to the guest at ``start`` (a KVM slot of its own)."""
        used = set(self._slots.values())
        slot = next((s for s in range(self._top_slot, -1, -1) if s not in used), None)
        if slot is None:
            raise PmemError("Unablet to allocate a KVM slot for the device")
        flags = KVM_MEM_READONLY if backing.read_only else 0
        self._vm.set_user_memory_region(slot, start, backing.mmap_len, backing.host_addr, flags)
        self._regions[start] = backing.mmap_len
        self._slots[start] = slot

    def unmap(self, start: int) -> None:
        """Take the region at ``start`` away from the guest (a zero-sized slot deletes it)."""
        slot = self._slots.pop(start, None)
        self._regions.pop(start, None)
        if slot is not None:
            self._vm.set_user_memory_region(slot, start, 0, 0, 0)
