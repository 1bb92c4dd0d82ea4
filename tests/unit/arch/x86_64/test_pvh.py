"""PVH start info: Xen's layout, the memmap shared with e820, the initrd module."""

from __future__ import annotations

import ctypes

import pytest

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.bootparams import BootParamsError, e820_map
from asyncvmm.arch.x86_64.pvh import (
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    write_pvh_start_info)
from asyncvmm.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30

# Offsets from xen/include/public/arch-x86/hvm/start_info.h (its ASCII diagram).
START_INFO_OFFSETS = {"magic": 0, "version": 4, "flags": 8, "nr_modules": 12, "modlist_paddr": 16,
                      "cmdline_paddr": 24, "rsdp_paddr": 32, "memmap_paddr": 40,
                      "memmap_entries": 48, "reserved": 52}


@pytest.mark.parametrize("field, offset", START_INFO_OFFSETS.items())
def test_start_info_offsets(field, offset):
    assert getattr(hvm_start_info, field).offset == offset


def test_struct_sizes_and_the_slot_layout_gives_them():
    assert ctypes.sizeof(hvm_start_info) == 56
    assert ctypes.sizeof(hvm_modlist_entry) == 32
    assert ctypes.sizeof(hvm_memmap_table_entry) == 24
    assert layout.PVH_INFO_START + ctypes.sizeof(hvm_start_info) <= layout.PVH_MEMMAP_START


def low_mem() -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(2 * MiB))])


def read_memmap(mem: GuestMemory, info: hvm_start_info) -> list[tuple[int, int, int]]:
    size = ctypes.sizeof(hvm_memmap_table_entry)
    entries = [mem.read_struct(info.memmap_paddr + i * size, hvm_memmap_table_entry)
               for i in range(info.memmap_entries)]
    assert all(e.reserved == 0 for e in entries)
    return [(e.addr, e.size, e.type) for e in entries]


@pytest.mark.parametrize("mem_size", [128 * MiB, 3 * GiB, 6 * GiB])
def test_start_info_and_memmap(mem_size):
    mem = low_mem()
    ram = layout.ram_layout(mem_size)
    addr = write_pvh_start_info(mem, mem_layout=ram, cmdline_addr=layout.CMDLINE_START,
                                rsdp_addr=layout.ACPI_START)
    assert addr == layout.PVH_INFO_START
    info = mem.read_struct(addr, hvm_start_info)
    assert (info.magic, info.version, info.flags) == (XEN_HVM_START_MAGIC_VALUE, 1, 0)
    assert (info.cmdline_paddr, info.rsdp_paddr) == (layout.CMDLINE_START, layout.ACPI_START)
    assert (info.nr_modules, info.modlist_paddr, info.reserved) == (0, 0, 0)
    assert info.memmap_paddr == layout.PVH_MEMMAP_START
    assert read_memmap(mem, info) == [(e.addr, e.size, e.type) for e in e820_map(ram)]


def test_memmap_carries_the_reserved_ranges():
    mem = low_mem()
    ram, ecam = layout.ram_layout(6 * GiB), (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE)
    write_pvh_start_info(mem, mem_layout=ram, cmdline_addr=layout.CMDLINE_START, reserved=[ecam],
                         initrd=(0x5000000, 0x4321))
    info = mem.read_struct(layout.PVH_INFO_START, hvm_start_info)
    got = read_memmap(mem, info)
    assert got == [(e.addr, e.size, e.type) for e in e820_map(ram, [ecam])]
    assert got[3] == (0xEEC0_0000, 256 * MiB, 2) and len(got) == 5     # XEN_HVM_MEMMAP_TYPE_RESERVED
    assert [a for a, _, _ in got] == sorted(a for a, _, _ in got)
    memmap_end = info.memmap_paddr + 5 * ctypes.sizeof(hvm_memmap_table_entry)
    assert info.modlist_paddr >= memmap_end                            # the module list moved along
    with pytest.raises(BootParamsError, match="overlaps"):
        write_pvh_start_info(mem, mem_layout=ram, cmdline_addr=0, reserved=[(GiB, MiB)])


def test_initrd_is_module_zero():
    mem = low_mem()
    write_pvh_start_info(mem, mem_layout=layout.ram_layout(6 * GiB), cmdline_addr=layout.CMDLINE_START,
                         initrd=(0x5000000, 0x4321))
    info = mem.read_struct(layout.PVH_INFO_START, hvm_start_info)
    assert info.nr_modules == 1 and info.rsdp_paddr == 0
    memmap_end = info.memmap_paddr + info.memmap_entries * ctypes.sizeof(hvm_memmap_table_entry)
    assert info.modlist_paddr >= memmap_end and info.modlist_paddr % 8 == 0
    mod = mem.read_struct(info.modlist_paddr, hvm_modlist_entry)
    assert (mod.paddr, mod.size, mod.cmdline_paddr, mod.reserved) == (0x5000000, 0x4321, 0, 0)
    assert info.modlist_paddr + ctypes.sizeof(hvm_modlist_entry) <= layout.ZERO_PAGE_START


def test_layout_errors_are_typed():
    with pytest.raises(BootParamsError):
        write_pvh_start_info(low_mem(), mem_layout=[(0, MiB)], cmdline_addr=layout.CMDLINE_START)
    tiny = GuestMemory.from_buffers([(0, bytearray(0x6010))])
    with pytest.raises(BootParamsError, match="no room"):
        write_pvh_start_info(tiny, mem_layout=layout.ram_layout(64 * MiB), cmdline_addr=0)
