"""Load a Linux ``bzImage`` for the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

Primer.  A bzImage is ``setup_sects + 1`` sectors of real-mode setup code
(``setup_sects`` 0 means 4) followed by the protected-mode kernel, which
decompresses itself.  ``struct setup_header`` sits at 0x1F1 and ends where
the short jump at 0x200 lands (``0x202 + image[0x201]``).  We never run the
real-mode part: the protected-mode kernel goes to ``pref_address`` and is
entered at load address + 0x200 in 64-bit mode.

Requirements and why:

* ``boot_flag`` 0xAA55 and ``header`` "HdrS": it is a bzImage at all.
* ``version`` >= 2.12: the 64-bit entry exists only if ``xloadflags`` has
  ``XLF_KERNEL_64``, and ``xloadflags`` exists from 2.12 (Linux 3.8) on.
  (2.06 gave ``cmdline_size``, 2.10 ``pref_address`` and ``init_size``.)
* ``loadflags`` ``LOADED_HIGH``: the kernel runs from 1 MiB or above.
* ``kernel_alignment`` a power of two when ``relocatable_kernel``.
* ``[load, runtime start + init_size)`` in low RAM, where the runtime start
  is the load address rounded up to ``kernel_alignment`` (a relocatable
  kernel decompresses there); ``init_size`` is what it needs before it
  reads the memory map, so the initrd must stay above that end.

The header bytes are returned unchanged for the zero page; the loader
fields in it are filled by :func:`bootparams.build_boot_params`.
"""

from __future__ import annotations

import ctypes

from asyncvmm.arch.x86_64.bootparams import (
    BOOT_FLAG_MAGIC, HDRS_MAGIC, LOADED_HIGH, SETUP_HEADER_MAX_LEN, SETUP_HEADER_MIN_LEN,
    SETUP_HEADER_OFFSET, XLF_KERNEL_64, setup_header)
from asyncvmm.arch.x86_64.layout import CMDLINE_MAX_SIZE, HIMEM_START
from asyncvmm.arch.x86_64.loader.common import (
    ImageFile, KernelLoad, LoaderError, align_up, check_fits, copy_to_guest)
from asyncvmm.memory import GuestMemory

MIN_VERSION = 0x020C
SECTOR = 512
DEFAULT_SETUP_SECTS = 4
ENTRY_64_OFFSET = 0x200          # the 64-bit entry, relative to the protected-mode kernel
JUMP_OFFSET = 0x200              # the short jump whose target marks the end of the header
SHORT_JMP = 0xEB
HEADER_PROBE_LEN = SETUP_HEADER_OFFSET + SETUP_HEADER_MAX_LEN  # 0x290: every header byte


def is_bzimage(head: bytes) -> bool:
    """Cheap sniff on the first 0x290 bytes: boot flag and "HdrS"."""
    if len(head) < SETUP_HEADER_OFFSET + SETUP_HEADER_MIN_LEN:
        return False
    hdr = setup_header.from_buffer_copy(_pad_header(head))
    return hdr.boot_flag == BOOT_FLAG_MAGIC and hdr.header == HDRS_MAGIC


def load_bzimage(mem: GuestMemory, img: ImageFile) -> KernelLoad:
    """Validate the setup header, load the protected-mode kernel, return how to enter it."""
    if img.size < HEADER_PROBE_LEN:
        raise LoaderError(f"bzImage truncated: {img.size} bytes, no room for a setup header")
    head = img.read_at(0, HEADER_PROBE_LEN)
    hdr = setup_header.from_buffer_copy(_pad_header(head))
    _check_header(hdr)
    raw_header = _header_bytes(head)
    kernel_offset = ((hdr.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR
    kernel_size = img.size - kernel_offset
    if kernel_size <= ENTRY_64_OFFSET or hdr.syssize * 16 > kernel_size:
        raise LoaderError(f"bzImage truncated: protected-mode kernel is {max(kernel_size, 0):#x} "
                          f"bytes, header says {hdr.syssize * 16:#x}")
    load_addr = hdr.pref_address or align_up(HIMEM_START, hdr.kernel_alignment or 1)
    if load_addr >= 1 << 32:
        raise LoaderError(f"bzImage pref_address {load_addr:#x} is above 4 GiB")
    runtime = align_up(load_addr, hdr.kernel_alignment) if hdr.relocatable_kernel else load_addr
    kernel_end = max(load_addr + kernel_size, runtime + hdr.init_size)
    check_fits(mem, load_addr, kernel_end, "bzImage kernel (with init_size)")
    copy_to_guest(img, mem, load_addr, kernel_offset, kernel_size)
    return KernelLoad(kind="bzimage", load_addr=load_addr, kernel_end=kernel_end,
                      entry=load_addr + ENTRY_64_OFFSET, pvh_entry=None, setup_header=raw_header,
                      initrd_addr_max=hdr.initrd_addr_max,
                      cmdline_max_len=min(hdr.cmdline_size, CMDLINE_MAX_SIZE - 1))


def _pad_header(head: bytes) -> bytes:
    raw = head[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + ctypes.sizeof(setup_header)]
    return raw.ljust(ctypes.sizeof(setup_header), b"\0")


def _header_bytes(head: bytes) -> bytes:
    """The header as the protocol defines its extent: 0x1F1 up to the jump's target."""
    if head[JUMP_OFFSET] != SHORT_JMP:
        raise LoaderError(f"bzImage has no short jump at {JUMP_OFFSET:#x}")
    end = JUMP_OFFSET + 2 + head[JUMP_OFFSET + 1]
    length = end - SETUP_HEADER_OFFSET
    if not SETUP_HEADER_MIN_LEN <= length <= SETUP_HEADER_MAX_LEN:
        raise LoaderError(f"bzImage setup header ends at {end:#x}; a 2.12+ header ends between "
                          f"{SETUP_HEADER_OFFSET + SETUP_HEADER_MIN_LEN:#x} and "
                          f"{SETUP_HEADER_OFFSET + SETUP_HEADER_MAX_LEN:#x}")
    return head[SETUP_HEADER_OFFSET:end]


def _check_header(hdr: setup_header) -> None:
    if hdr.boot_flag != BOOT_FLAG_MAGIC or hdr.header != HDRS_MAGIC:
        raise LoaderError("not a bzImage: no 0xAA55 boot flag and \"HdrS\" header")
    if hdr.version < MIN_VERSION:
        raise LoaderError(f"boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02} is too old; "
                          "the 64-bit entry needs 2.12 or later")
    if not hdr.loadflags & LOADED_HIGH:
        raise LoaderError("bzImage does not load high (LOADED_HIGH clear): a zImage")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise LoaderError("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    align = hdr.kernel_alignment
    if (hdr.relocatable_kernel or not hdr.pref_address) and (align == 0 or align & (align - 1)):
        raise LoaderError(f"bzImage kernel_alignment {align:#x} is not a power of two")
    if hdr.pref_address and hdr.pref_address < HIMEM_START:
        raise LoaderError(f"bzImage pref_address {hdr.pref_address:#x} is below 1 MiB")
