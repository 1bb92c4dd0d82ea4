"""The Linux x86 zero page (``struct boot_params``), the e820 map and the command line.

Primer.  A 64-bit Linux kernel entered at its 64-bit entry point finds, in
``%rsi``, the guest-physical address of a 4 KiB ``struct boot_params`` (the
"zero page", Documentation/arch/x86/zero-page.rst).  The loader fills in:

* ``hdr`` (``struct setup_header`` at 0x1F1): for a bzImage, the header bytes
  copied from the image (0x1F1 up to ``0x202 + image[0x201]``), then the
  fields a boot loader writes: ``type_of_loader``, ``cmd_line_ptr``,
  ``ramdisk_image``/``ramdisk_size`` (high halves in ``ext_*``).  For an ELF
  vmlinux there is no header in the image; we write the same loader fields
  plus ``boot_flag``/``header`` so the page reads as a valid header.
* ``e820_table``/``e820_entries``: the physical memory map.
* ``acpi_rsdp_addr``: saves the kernel its scan of 0xE0000..0xFFFFF.

Structures are ``ctypes`` copies of arch/x86/include/uapi/asm/bootparam.h
(kernel field order and names); sub-structures this VMM never fills
(screen_info, edid_info, ...) are opaque byte arrays of the kernel's size.
Pure data: nothing here touches guest memory except :func:`write_cmdline`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterable

from asyncvmm.arch.x86_64 import layout
from asyncvmm.memory import GuestMemory, GuestMemoryError

# setup_header constants (Documentation/arch/x86/boot.rst).
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448          # "HdrS"
LOADED_HIGH = 1 << 0             # loadflags: protected-mode code loads at 0x100000
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0           # xloadflags: 64-bit entry at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
TYPE_OF_LOADER_UNDEFINED = 0xFF  # a boot loader without an assigned id
SETUP_HEADER_OFFSET = 0x1F1      # where the header sits both in a bzImage and in boot_params

# e820 types (arch/x86/include/asm/e820/types.h).
E820_TYPE_RAM = 1
E820_TYPE_RESERVED = 2
E820_TYPE_ACPI = 3
E820_TYPE_NVS = 4
E820_TYPE_UNUSABLE = 5
E820_TYPE_PMEM = 7
E820_MAX_ENTRIES_ZEROPAGE = 128
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6


class BootParamsError(ValueError):
    """Boot parameters that cannot describe this guest (memory map, header, addresses)."""


class CmdlineError(BootParamsError):
    """A kernel command line that is too long or cannot be passed to the kernel."""


class setup_header(ctypes.LittleEndianStructure):
    """struct setup_header (boot protocol 2.15), packed."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


class boot_e820_entry(ctypes.LittleEndianStructure):
    """struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; } packed."""

    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


class boot_params(ctypes.LittleEndianStructure):
    """struct boot_params, the 4096-byte zero page, packed."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),                 # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),               # 0x040
        ("_pad2", ctypes.c_uint8 * 4),                          # 0x054
        ("tboot_addr", ctypes.c_uint64),                        # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),                    # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),                    # 0x070
        ("_pad3", ctypes.c_uint8 * 8),                          # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),                      # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),                      # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 0x10),              # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 0x10),             # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),                 # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),                  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),                  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),                        # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),                   # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),                   # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),                    # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),                         # 0x1e0
        ("scratch", ctypes.c_uint32),                           # 0x1e4
        ("e820_entries", ctypes.c_uint8),                       # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),                     # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),            # 0x1ea
        ("kbd_status", ctypes.c_uint8),                         # 0x1eb
        ("secure_boot", ctypes.c_uint8),                        # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),                          # 0x1ed
        ("sentinel", ctypes.c_uint8),                           # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),                          # 0x1f0
        ("hdr", setup_header),                                  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - ctypes.sizeof(setup_header))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),                         # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (82 * EDDMAXNR)),           # 0xd00, struct edd_info[6]
        ("_pad9", ctypes.c_uint8 * 276),                        # 0xeec
    ]


# Bytes of boot_params a copied setup header may occupy: up to edd_mbr_sig_buffer.
SETUP_HEADER_MAX_LEN = boot_params.edd_mbr_sig_buffer.offset - SETUP_HEADER_OFFSET
# A protocol 2.12 header ends after handover_offset; we rely on every field up to there.
SETUP_HEADER_MIN_LEN = setup_header.kernel_info_offset.offset


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(mem_layout: Iterable[tuple[int, int]],
             reserved: Iterable[tuple[int, int]] = ()) -> list[E820Entry]:
    """The guest's physical memory map, shared by the zero page and PVH.

    ``mem_layout`` is ``[(guest_addr, size), ...]`` as from
    :func:`layout.ram_layout`.  0..EBDA is RAM; EBDA..1 MiB is one reserved
    range covering the MP table (EBDA) and the ACPI tables at 0xE0000.  We
    type the ACPI area *reserved* rather than E820_TYPE_ACPI: Linux forces
    640 KiB..1 MiB to reserved on its own (``trim_bios_range``) and looks
    for the RSDP and MP table there whatever the type, and "ACPI reclaimable"
    would invite an OS to reuse pages whose tables it reads again at runtime
    (DSDT AML is interpreted in place).  The MMIO gap is simply absent,
    except for the ``reserved`` ``(addr, size)`` ranges, typed
    E820_TYPE_RESERVED: with PCI, the ECAM, which Linux accepts as MMCONFIG
    only if firmware reserves it.  Entries come in address order.
    """
    regions = sorted((int(gpa), int(size)) for gpa, size in mem_layout)
    if not regions or regions[0][0] != 0:
        raise BootParamsError("guest RAM must start at address 0")
    for (gpa, size), nxt in zip(regions, regions[1:] + [None]):
        if size <= 0:
            raise BootParamsError(f"empty RAM region at {gpa:#x}")
        if nxt is not None and gpa + size > nxt[0]:
            raise BootParamsError(f"RAM regions overlap at {nxt[0]:#x}")
    low_end = regions[0][1]
    if low_end <= layout.HIMEM_START:
        raise BootParamsError(f"guest RAM ({low_end:#x} bytes) must extend past 1 MiB")
    entries = [
        E820Entry(0, layout.EBDA_START, E820_TYPE_RAM),
        E820Entry(layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820_TYPE_RESERVED),
        E820Entry(layout.HIMEM_START, low_end - layout.HIMEM_START, E820_TYPE_RAM),
    ]
    entries += [E820Entry(gpa, size, E820_TYPE_RAM) for gpa, size in regions[1:]]
    for gpa, size in sorted((int(gpa), int(size)) for gpa, size in reserved):
        if size <= 0 or gpa < 0:
            raise BootParamsError(f"empty or negative reserved range {gpa:#x}+{size:#x}")
        clash = next((e for e in entries if gpa < e.end and e.addr < gpa + size), None)
        if clash is not None:
            raise BootParamsError(f"reserved range {gpa:#x}+{size:#x} overlaps the e820 entry "
                                  f"{clash.addr:#x}+{clash.size:#x}")
        entries.append(E820Entry(gpa, size, E820_TYPE_RESERVED))
    return sorted(entries, key=lambda e: e.addr)


def encode_cmdline(cmdline: str | bytes, max_len: int) -> bytes:
    """The command line as NUL-terminated bytes, checked against ``max_len`` (NUL excluded)."""
    if isinstance(cmdline, str):
        try:
            raw = cmdline.encode("ascii")
        except UnicodeEncodeError as e:
            raise CmdlineError(f"kernel command line is not ASCII at position {e.start}") from None
    else:
        raw = bytes(cmdline)
    if b"\0" in raw:
        raise CmdlineError("kernel command line contains a NUL byte")
    limit = min(max_len, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise CmdlineError(f"kernel command line is {len(raw)} bytes; the limit is {limit}")
    return raw + b"\0"


def write_cmdline(mem: GuestMemory, cmdline: str | bytes, *, max_len: int,
                  addr: int = layout.CMDLINE_START) -> int:
    """Write the NUL-terminated command line at ``addr``; return its length without the NUL.

    ``max_len`` is the kernel's limit (``KernelLoad.cmdline_max_len``).
    """
    data = encode_cmdline(cmdline, max_len)
    try:
        mem.write(addr, data)
    except GuestMemoryError as e:
        raise CmdlineError(f"no room for the command line: {e}") from e
    return len(data) - 1


def build_boot_params(*, mem_layout: Iterable[tuple[int, int]], cmdline_addr: int, cmdline_len: int,
                      initrd: tuple[int, int] | None = None, setup_header: bytes | None = None,
                      acpi_rsdp_addr: int | None = None,
                      reserved: Iterable[tuple[int, int]] = ()) -> bytes:
    """The 4096-byte zero page for the 64-bit boot protocol.

    ``setup_header`` is ``KernelLoad.setup_header`` (bzImage) or None (ELF);
    ``initrd`` is ``(addr, size)``; ``cmdline_len`` excludes the NUL;
    ``reserved`` ranges ``(addr, size)`` go into the e820 map (see :func:`e820_map`).
    """
    if not 0 <= cmdline_len < layout.CMDLINE_MAX_SIZE:
        raise CmdlineError(f"kernel command line length {cmdline_len} out of range")
    params = boot_params()
    hdr = params.hdr
    if setup_header is not None:
        _copy_setup_header(params, setup_header)
        if cmdline_len > hdr.cmdline_size:
            raise CmdlineError(f"kernel command line is {cmdline_len} bytes; "
                               f"this kernel accepts {hdr.cmdline_size}")
    else:
        hdr.boot_flag = BOOT_FLAG_MAGIC
        hdr.header = HDRS_MAGIC
    # heap_end_ptr/CAN_USE_HEAP concern only the 16-bit setup code, which the
    # 64-bit entry skips, so they stay as the kernel image has them.
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.cmd_line_ptr, params.ext_cmd_line_ptr = _split_u64(cmdline_addr, "command line address")
    if initrd is not None:
        _set_initrd(params, initrd, above_4g_ok=setup_header is None
                    or bool(hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G))
    _set_e820(params, e820_map(mem_layout, reserved))
    if acpi_rsdp_addr is not None:
        params.acpi_rsdp_addr = acpi_rsdp_addr
    return bytes(params)


def _copy_setup_header(params: boot_params, raw: bytes) -> None:
    if not SETUP_HEADER_MIN_LEN <= len(raw) <= SETUP_HEADER_MAX_LEN:
        raise BootParamsError(f"setup header of {len(raw)} bytes is not a 2.12+ header")
    ctypes.memmove(ctypes.addressof(params) + SETUP_HEADER_OFFSET, raw, len(raw))


def _split_u64(value: int, what: str) -> tuple[int, int]:
    if not 0 <= value < 1 << 64:
        raise BootParamsError(f"{what} {value:#x} out of range")
    return value & 0xFFFF_FFFF, value >> 32


def _set_initrd(params: boot_params, initrd: tuple[int, int], *, above_4g_ok: bool) -> None:
    addr, size = initrd
    if addr + size > 1 << 32 and not above_4g_ok:
        raise BootParamsError(f"initrd at {addr:#x} is above 4 GiB; this kernel cannot use it")
    params.hdr.ramdisk_image, params.ext_ramdisk_image = _split_u64(addr, "initrd address")
    params.hdr.ramdisk_size, params.ext_ramdisk_size = _split_u64(size, "initrd size")


def _set_e820(params: boot_params, entries: list[E820Entry]) -> None:
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootParamsError(f"{len(entries)} e820 entries exceed the zero page's "
                              f"{E820_MAX_ENTRIES_ZEROPAGE}")
    for slot, entry in zip(params.e820_table, entries):
        slot.addr, slot.size, slot.type = entry.addr, entry.size, entry.type
    params.e820_entries = len(entries)
