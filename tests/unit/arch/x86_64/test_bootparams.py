"""The zero page: layout against the kernel's offsets, e820, command line, header copy."""

from __future__ import annotations

import ctypes
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.bootparams import (
    CAN_USE_HEAP, E820_TYPE_RAM, E820_TYPE_RESERVED, LOADED_HIGH, XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64, BootParamsError, CmdlineError, E820Entry, boot_e820_entry, boot_params,
    build_boot_params, e820_map, setup_header, write_cmdline)
from asyncvmm.arch.x86_64.loader import load_kernel
from asyncvmm.memory import GuestMemory

from .kernel_images import make_bzimage

MiB = 1 << 20
GiB = 1 << 30

# Offsets from arch/x86/include/uapi/asm/bootparam.h (the comments there) and boot.rst's header table.
BOOT_PARAMS_OFFSETS = {
    "screen_info": 0x000, "apm_bios_info": 0x040, "tboot_addr": 0x058, "ist_info": 0x060,
    "acpi_rsdp_addr": 0x070, "hd0_info": 0x080, "hd1_info": 0x090, "sys_desc_table": 0x0A0,
    "olpc_ofw_header": 0x0B0, "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
    "ext_cmd_line_ptr": 0x0C8, "cc_blob_address": 0x13C, "edid_info": 0x140, "efi_info": 0x1C0,
    "alt_mem_k": 0x1E0, "scratch": 0x1E4, "e820_entries": 0x1E8, "eddbuf_entries": 0x1E9,
    "edd_mbr_sig_buf_entries": 0x1EA, "kbd_status": 0x1EB, "secure_boot": 0x1EC, "sentinel": 0x1EF,
    "hdr": 0x1F1, "edd_mbr_sig_buffer": 0x290, "e820_table": 0x2D0, "eddbuf": 0xD00,
}
SETUP_HEADER_OFFSETS = {
    "setup_sects": 0x1F1, "root_flags": 0x1F2, "syssize": 0x1F4, "ram_size": 0x1F8, "vid_mode": 0x1FA,
    "root_dev": 0x1FC, "boot_flag": 0x1FE, "jump": 0x200, "header": 0x202, "version": 0x206,
    "realmode_swtch": 0x208, "start_sys_seg": 0x20C, "kernel_version": 0x20E, "type_of_loader": 0x210,
    "loadflags": 0x211, "setup_move_size": 0x212, "code32_start": 0x214, "ramdisk_image": 0x218,
    "ramdisk_size": 0x21C, "bootsect_kludge": 0x220, "heap_end_ptr": 0x224, "ext_loader_ver": 0x226,
    "ext_loader_type": 0x227, "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C,
    "kernel_alignment": 0x230, "relocatable_kernel": 0x234, "min_alignment": 0x235,
    "xloadflags": 0x236, "cmdline_size": 0x238, "hardware_subarch": 0x23C,
    "hardware_subarch_data": 0x240, "payload_offset": 0x248, "payload_length": 0x24C,
    "setup_data": 0x250, "pref_address": 0x258, "init_size": 0x260, "handover_offset": 0x264,
    "kernel_info_offset": 0x268,
}


@pytest.mark.parametrize("field, offset", BOOT_PARAMS_OFFSETS.items())
def test_boot_params_offsets_match_the_kernel(field, offset):
    assert getattr(boot_params, field).offset == offset


@pytest.mark.parametrize("field, offset", SETUP_HEADER_OFFSETS.items())
def test_setup_header_offsets_match_boot_rst(field, offset):
    assert 0x1F1 + getattr(setup_header, field).offset == offset


def test_struct_sizes():
    assert ctypes.sizeof(boot_params) == 4096
    assert ctypes.sizeof(setup_header) == 0x26C - 0x1F1
    assert ctypes.sizeof(boot_e820_entry) == 20


def test_e820_small_guest():
    assert e820_map(layout.ram_layout(256 * MiB)) == [
        E820Entry(0, 0x9FC00, E820_TYPE_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_TYPE_RESERVED),
        E820Entry(0x100000, 256 * MiB - 0x100000, E820_TYPE_RAM),
    ]


def test_e820_large_guest_leaves_the_mmio_gap_out():
    entries = e820_map(layout.ram_layout(6 * GiB))
    assert entries[2] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_TYPE_RAM)
    assert entries[3] == E820Entry(4 * GiB, 3 * GiB, E820_TYPE_RAM)
    assert len(entries) == 4


def test_e820_reserved_range_covers_mptable_and_acpi():
    reserved = e820_map(layout.ram_layout(64 * MiB))[1]
    for addr in (layout.EBDA_START, layout.ACPI_START, layout.ACPI_END - 1):
        assert reserved.addr <= addr < reserved.end


@pytest.mark.parametrize("mem_layout, match", [
    ([(0, MiB)], "past 1 MiB"),
    ([(0x1000, 64 * MiB)], "start at address 0"),
    ([], "start at address 0"),
    ([(0, 64 * MiB), (32 * MiB, MiB)], "overlap"),
    ([(0, 64 * MiB), (4 * GiB, 0)], "empty"),
])
def test_e820_refuses_impossible_layouts(mem_layout, match):
    with pytest.raises(BootParamsError, match=match):
        e820_map(mem_layout)


@given(st.integers(2 * MiB, layout.MAX_MEM_SIZE))
def test_e820_accounts_for_all_ram_and_avoids_the_gap(mem_size):
    entries = e820_map(layout.ram_layout(mem_size))
    assert sum(e.size for e in entries) == mem_size
    assert all(a.end <= b.addr for a, b in zip(entries, entries[1:]))
    assert not any(e.addr < layout.MMIO32_END and e.end > layout.MMIO32_START for e in entries)


ECAM = (layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE)


def test_e820_reserved_ranges_are_type_2_in_address_order():
    high = (1 << 40, 2 * MiB)
    entries = e820_map(layout.ram_layout(6 * GiB), [high, ECAM])
    assert [(e.addr, e.size, e.type) for e in entries] == [
        (0, 0x9FC00, E820_TYPE_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, E820_TYPE_RESERVED),
        (0x100000, 3 * GiB - 0x100000, E820_TYPE_RAM),
        (0xEEC0_0000, 256 * MiB, E820_TYPE_RESERVED),
        (4 * GiB, 3 * GiB, E820_TYPE_RAM),
        (1 << 40, 2 * MiB, E820_TYPE_RESERVED),
    ]
    assert e820_map(layout.ram_layout(64 * MiB), [ECAM])[3] == E820Entry(*ECAM, E820_TYPE_RESERVED)


@pytest.mark.parametrize("reserved, match", [
    ([(64 * MiB, 0)], "empty"),
    ([(-4096, 8192)], "negative"),
    ([(32 * MiB, MiB)], "overlaps the e820 entry 0x100000"),            # RAM
    ([(0xA0000, 0x1000)], "overlaps the e820 entry 0x9fc00"),           # EBDA/ACPI reservation
    ([ECAM, (0xFE00_0000, 32 * MiB)], "overlaps the e820 entry 0xeec00000"),
])
def test_e820_refuses_reserved_ranges_that_overlap(reserved, match):
    with pytest.raises(BootParamsError, match=match):
        e820_map(layout.ram_layout(128 * MiB), reserved)


def zero_page(**kw) -> boot_params:
    args = dict(mem_layout=layout.ram_layout(128 * MiB), cmdline_addr=layout.CMDLINE_START, cmdline_len=10)
    args.update(kw)
    raw = build_boot_params(**args)
    assert len(raw) == 4096
    return boot_params.from_buffer_copy(raw)


def test_elf_zero_page_fields():
    p = zero_page(initrd=(0x7000000, 0x123456), acpi_rsdp_addr=layout.ACPI_START)
    assert (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader) == (0xAA55, 0x53726448, 0xFF)
    assert (p.hdr.cmd_line_ptr, p.ext_cmd_line_ptr) == (layout.CMDLINE_START, 0)
    assert (p.hdr.ramdisk_image, p.hdr.ramdisk_size) == (0x7000000, 0x123456)
    assert (p.ext_ramdisk_image, p.ext_ramdisk_size) == (0, 0)
    assert p.acpi_rsdp_addr == layout.ACPI_START
    assert p.sentinel == 0   # non-zero makes the kernel wipe fields it thinks a broken loader left
    assert p.e820_entries == 3
    got = [(e.addr, e.size, e.type) for e in p.e820_table[:3]]
    assert got == [(e.addr, e.size, e.type) for e in e820_map(layout.ram_layout(128 * MiB))]


def test_zero_page_carries_the_reserved_ranges():
    p = zero_page(mem_layout=layout.ram_layout(6 * GiB), reserved=[ECAM])
    assert p.e820_entries == 5
    assert [(e.addr, e.size, e.type) for e in p.e820_table[:5]] == [
        (e.addr, e.size, e.type) for e in e820_map(layout.ram_layout(6 * GiB), [ECAM])]
    assert (p.e820_table[3].addr, p.e820_table[3].type) == (layout.PCI_ECAM_START, 2)


def test_no_initrd_no_rsdp_leaves_fields_zero():
    p = zero_page()
    assert (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.acpi_rsdp_addr) == (0, 0, 0)


def test_bzimage_header_is_copied_then_loader_fields_set():
    image = make_bzimage(b"\x90" * 0x1000, version=0x020F, loadflags=LOADED_HIGH | CAN_USE_HEAP,
                         heap_end_ptr=0x1234, root_flags=1, vid_mode=0xFFFF)
    k = load_kernel(GuestMemory.from_buffers([(0, bytearray(64 * MiB))]), io.BytesIO(image))
    p = zero_page(setup_header=k.setup_header, initrd=(0x3000000, 0x1000))
    assert p.hdr.version == 0x020F and p.hdr.pref_address == 0x1000000
    assert (p.hdr.root_flags, p.hdr.vid_mode, p.hdr.heap_end_ptr) == (1, 0xFFFF, 0x1234)
    assert p.hdr.loadflags == LOADED_HIGH | CAN_USE_HEAP and p.hdr.xloadflags == XLF_KERNEL_64
    assert p.hdr.type_of_loader == 0xFF
    assert p.hdr.cmd_line_ptr == layout.CMDLINE_START
    assert (p.hdr.ramdisk_image, p.hdr.ramdisk_size) == (0x3000000, 0x1000)


def test_command_line_longer_than_the_kernels_limit_is_refused():
    k = load_kernel(GuestMemory.from_buffers([(0, bytearray(64 * MiB))]),
                    io.BytesIO(make_bzimage(b"\x90" * 0x1000, cmdline_size=255)))
    zero_page(setup_header=k.setup_header, cmdline_len=255)
    with pytest.raises(CmdlineError, match="accepts 255"):
        zero_page(setup_header=k.setup_header, cmdline_len=256)


@pytest.mark.parametrize("length", [0x76, 0xA0])
def test_setup_header_of_impossible_length_is_refused(length):
    with pytest.raises(BootParamsError, match="setup header"):
        zero_page(setup_header=bytes(length))


def test_high_addresses_use_the_ext_fields():
    p = zero_page(cmdline_addr=(5 << 32) | 0x1000, initrd=((1 << 32) + 0x2000, 0x3000))
    assert (p.hdr.cmd_line_ptr, p.ext_cmd_line_ptr) == (0x1000, 5)
    assert (p.hdr.ramdisk_image, p.ext_ramdisk_image) == (0x2000, 1)


def test_initrd_above_4g_needs_the_kernels_consent():
    plain = make_bzimage(b"\x90" * 0x1000)
    able = make_bzimage(b"\x90" * 0x1000, xloadflags=XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G)
    mem = GuestMemory.from_buffers([(0, bytearray(64 * MiB))])
    hdr_plain = load_kernel(mem, io.BytesIO(plain)).setup_header
    hdr_able = load_kernel(mem, io.BytesIO(able)).setup_header
    with pytest.raises(BootParamsError, match="above 4 GiB"):
        zero_page(setup_header=hdr_plain, initrd=(1 << 32, 0x1000))
    assert zero_page(setup_header=hdr_able, initrd=(1 << 32, 0x1000)).ext_ramdisk_image == 1


def test_write_cmdline_nul_terminates_at_cmdline_start():
    mem = GuestMemory.from_buffers([(0, bytearray(4 * MiB))])
    n = write_cmdline(mem, "console=ttyS0 reboot=k", max_len=2047)
    assert n == 22
    assert mem.read(layout.CMDLINE_START, 23) == b"console=ttyS0 reboot=k\0"


def test_write_cmdline_limits():
    mem = GuestMemory.from_buffers([(0, bytearray(4 * MiB))])
    assert write_cmdline(mem, b"x" * 255, max_len=255) == 255
    with pytest.raises(CmdlineError, match="limit is 255"):
        write_cmdline(mem, b"x" * 256, max_len=255)
    with pytest.raises(CmdlineError, match="limit is 4095"):
        write_cmdline(mem, "x" * 4096, max_len=1 << 20)
    with pytest.raises(CmdlineError, match="NUL"):
        write_cmdline(mem, b"a\0b", max_len=255)
    with pytest.raises(CmdlineError, match="not ASCII"):
        write_cmdline(mem, "root=/dev/vdä", max_len=255)
    with pytest.raises(CmdlineError, match="no room"):
        write_cmdline(GuestMemory.from_buffers([(0, bytearray(0x20004))]), "abcdefgh", max_len=255)


def test_cmdline_len_out_of_range_is_refused():
    with pytest.raises(CmdlineError):
        zero_page(cmdline_len=layout.CMDLINE_MAX_SIZE)
