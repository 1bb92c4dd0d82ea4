"""x86-64 kernel loaders: ELF vmlinux and bzImage, plus initrd placement.

Contract: :func:`load_kernel` reads a kernel image (path or binary file
object), writes it into :class:`~asyncvmm.memory.GuestMemory` and returns a
:class:`KernelLoad` saying where it went and how to enter it.  It never
touches vCPU registers.  Any image problem, including one that does not fit
in guest RAM, is a :class:`LoaderError`.

Typical use by the builder::

    kernel = load_kernel(mem, "vmlinux")
    initrd = load_initrd(mem, "initrd.cpio", kernel_end=kernel.kernel_end,
                         initrd_addr_max=kernel.initrd_addr_max)
    cmdline_len = write_cmdline(mem, boot_args, max_len=kernel.cmdline_max_len)
    zero_page = build_boot_params(mem_layout=..., cmdline_addr=CMDLINE_START,
                                  cmdline_len=cmdline_len, initrd=initrd.as_tuple(),
                                  setup_header=kernel.setup_header, acpi_rsdp_addr=...)
"""

from __future__ import annotations

from asyncvmm.arch.x86_64.loader.bzimage import HEADER_PROBE_LEN, is_bzimage, load_bzimage
from asyncvmm.arch.x86_64.loader.common import (
    DEFAULT_INITRD_ADDR_MAX, ImageFile, KernelLoad, KernelSource, LoaderError)
from asyncvmm.arch.x86_64.loader.elf import is_elf, load_elf
from asyncvmm.arch.x86_64.loader.initrd import InitrdLoad, initrd_placement, load_initrd
from asyncvmm.memory import GuestMemory

__all__ = ["DEFAULT_INITRD_ADDR_MAX", "InitrdLoad", "KernelLoad", "LoaderError", "initrd_placement",
           "load_initrd", "load_kernel"]


def load_kernel(mem: GuestMemory, kernel: KernelSource) -> KernelLoad:
    """Load an ELF vmlinux or a bzImage, whichever ``kernel`` is."""
    with ImageFile(kernel) as img:
        head = img.read_at(0, min(img.size, HEADER_PROBE_LEN))
        if is_elf(head):
            return load_elf(mem, img)
        if is_bzimage(head):
            return load_bzimage(mem, img)
    raise LoaderError("kernel image is neither an ELF vmlinux nor a bzImage")
