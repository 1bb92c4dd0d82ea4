"""Place an initrd in guest memory the way boot.rst asks boot loaders to.

The initrd goes page-aligned as high as possible in low RAM: it must end at
or below ``initrd_addr_max + 1`` (the header's "highest address that may be
occupied", inclusive) and below the end of the RAM region at address 0, and
it must start at or above the kernel's end (for a bzImage that end includes
``init_size``, the memory the kernel claims before it reads the memory map).
Going high keeps it out of the way of the decompressor and early
allocations; the kernel frees it after unpacking.

Returns ``(addr, size)`` for ``ramdisk_image``/``ramdisk_size`` or the PVH
module list.  No vCPU state, no zero page: those are other steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.arch.x86_64.loader.common import (
    DEFAULT_INITRD_ADDR_MAX, PAGE_SIZE, ImageFile, KernelSource, LoaderError, align_down,
    align_up, copy_to_guest, low_ram_end)
from asyncvmm.memory import GuestMemory


@dataclass(frozen=True)
class InitrdLoad:
    addr: int
    size: int

    def as_tuple(self) -> tuple[int, int]:
        return self.addr, self.size


def initrd_placement(size: int, *, ram_end: int, kernel_end: int,
                     initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX) -> int:
    """The guest address for an initrd of ``size`` bytes, or LoaderError if none fits."""
    if size <= 0:
        raise LoaderError("initrd is empty")
    top = min(initrd_addr_max + 1, ram_end)
    addr = align_down(top - size, PAGE_SIZE)
    floor = align_up(kernel_end, PAGE_SIZE)
    if addr < floor:
        raise LoaderError(f"initrd of {size:#x} bytes does not fit between the kernel's end "
                          f"{floor:#x} and {top:#x} (limit of RAM and of the kernel's "
                          f"initrd_addr_max {initrd_addr_max:#x})")
    return addr


def load_initrd(mem: GuestMemory, initrd: KernelSource, *, kernel_end: int,
                initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX) -> InitrdLoad:
    """Copy the initrd file into guest RAM at :func:`initrd_placement`."""
    with ImageFile(initrd) as img:
        addr = initrd_placement(img.size, ram_end=low_ram_end(mem), kernel_end=kernel_end,
                                initrd_addr_max=initrd_addr_max)
        copy_to_guest(img, mem, addr, 0, img.size)
    return InitrdLoad(addr, img.size)
