"""PVH boot information: ``struct hvm_start_info`` and its tables.

Primer.  A kernel with a Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` note can be entered
directly in 32-bit protected mode, paging off, with ``%ebx`` holding the
guest-physical address of a ``struct hvm_start_info`` (Xen's
xen/include/public/arch-x86/hvm/start_info.h; docs/misc/pvh.pandoc).  The
structure points at the command line, a module list (entry 0 is the initrd
for Linux) and, from version 1 on, a memory map in e820 form.  Linux has no
other way to learn its memory map on a PVH boot outside Xen, so version 1
with a memmap is required here, not optional.

Placement: start info at ``layout.PVH_INFO_START``, memmap at
``layout.PVH_MEMMAP_START``, the one-entry module list right after the
memmap (layout.py reserves no slot for it; the page up to the zero page,
unused on a PVH boot, has room for ~160 memmap entries).

The memmap carries exactly :func:`bootparams.e820_map`; XEN_HVM_MEMMAP_TYPE_*
values equal the e820 types.  Only :func:`write_pvh_start_info` touches
guest memory.
"""

from __future__ import annotations

import ctypes
from typing import Iterable

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.bootparams import BootParamsError, e820_map
from asyncvmm.memory import GuestMemory, GuestMemoryError

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1       # the first version with memmap_paddr/memmap_entries

XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
XEN_HVM_MEMMAP_TYPE_ACPI = 3
XEN_HVM_MEMMAP_TYPE_NVS = 4
XEN_HVM_MEMMAP_TYPE_UNUSABLE = 5
XEN_HVM_MEMMAP_TYPE_DISABLED = 6
XEN_HVM_MEMMAP_TYPE_PMEM = 7


class hvm_start_info(ctypes.LittleEndianStructure):
    """struct hvm_start_info (naturally aligned, 56 bytes)."""

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),     # version >= 1
        ("memmap_entries", ctypes.c_uint32),   # version >= 1
        ("reserved", ctypes.c_uint32),
    ]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    """struct hvm_modlist_entry (32 bytes)."""

    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    """struct hvm_memmap_table_entry (24 bytes)."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


def pvh_memmap(mem_layout: Iterable[tuple[int, int]],
               reserved: Iterable[tuple[int, int]] = ()) -> bytes:
    """The memmap table: the e820 map as hvm_memmap_table_entry records."""
    return b"".join(bytes(hvm_memmap_table_entry(addr=e.addr, size=e.size, type=e.type))
                    for e in e820_map(mem_layout, reserved))


def modlist_addr(memmap_len: int) -> int:
    """Where the module list goes: after the memmap, 8-byte aligned."""
    return (layout.PVH_MEMMAP_START + memmap_len + 7) & ~7


def write_pvh_start_info(mem: GuestMemory, *, mem_layout: Iterable[tuple[int, int]],
                         cmdline_addr: int, initrd: tuple[int, int] | None = None,
                         rsdp_addr: int | None = None,
                         reserved: Iterable[tuple[int, int]] = ()) -> int:
    """Write start info, memmap and module list; return the start info address (for ``%ebx``).

    ``reserved`` ``(addr, size)`` ranges join the memmap as XEN_HVM_MEMMAP_TYPE_RESERVED.
    """
    memmap = pvh_memmap(mem_layout, reserved)
    blobs = [(layout.PVH_MEMMAP_START, memmap)]
    nr_modules = modlist = 0
    if initrd is not None:
        addr, size = initrd
        nr_modules, modlist = 1, modlist_addr(len(memmap))
        blobs.append((modlist, bytes(hvm_modlist_entry(paddr=addr, size=size))))
    info = hvm_start_info(magic=XEN_HVM_START_MAGIC_VALUE, version=HVM_START_INFO_VERSION,
                          nr_modules=nr_modules, modlist_paddr=modlist,
                          cmdline_paddr=cmdline_addr, rsdp_paddr=rsdp_addr or 0,
                          memmap_paddr=layout.PVH_MEMMAP_START,
                          memmap_entries=len(memmap) // ctypes.sizeof(hvm_memmap_table_entry))
    blobs.insert(0, (layout.PVH_INFO_START, bytes(info)))
    end = max(gpa + len(data) for gpa, data in blobs)
    if end > layout.ZERO_PAGE_START:
        raise BootParamsError(f"PVH boot information ends at {end:#x}, past its page")
    try:
        for gpa, data in blobs:
            mem.write(gpa, data)
    except GuestMemoryError as e:
        raise BootParamsError(f"no room for PVH boot information: {e}") from e
    return layout.PVH_INFO_START
