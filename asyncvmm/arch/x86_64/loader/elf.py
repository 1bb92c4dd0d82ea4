"""Load an uncompressed x86-64 ``vmlinux`` (ELF64 EXEC) into guest memory.

Primer.  The ELF header (64 bytes) names the program header table; each
``PT_LOAD`` program header says: copy ``p_filesz`` bytes from ``p_offset``
to address ``p_paddr`` and zero the rest up to ``p_memsz`` (bss).  A Linux
vmlinux links its code at virtual 0xffffffff81000000 but gives physical
load addresses in ``p_paddr``, so we load by ``p_paddr``.

Entry point: Linux links vmlinux with ``ENTRY(phys_startup_64)``, so
``e_entry`` is already physical.  To serve images linked the other way too,
``e_entry`` is used as-is when it falls inside a loaded segment's physical
range, translated by that segment's ``p_vaddr -> p_paddr`` offset when it
falls inside a virtual range, and refused otherwise.  (Physical first:
Linux's per-CPU segment has ``p_vaddr`` 0, which would otherwise shadow
low addresses.)

PVH: a ``PT_NOTE`` with name "Xen" and type ``XEN_ELFNOTE_PHYS32_ENTRY``
(18) carries a 32-bit physical entry; Linux stores it as an 8-byte value,
others as 4, so both sizes are accepted if the value fits 32 bits.

Everything is validated before the first write to guest memory.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from asyncvmm.arch.x86_64.layout import CMDLINE_MAX_SIZE
from asyncvmm.arch.x86_64.loader.common import (
    DEFAULT_INITRD_ADDR_MAX, ImageFile, KernelLoad, LoaderError, check_fits, copy_to_guest,
    zero_guest)
from asyncvmm.memory import GuestMemory

ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
XEN_ELFNOTE_PHYS32_ENTRY = 18

MAX_PHNUM = 128                  # a vmlinux has about 5; more is a malformed image
MAX_NOTE_SEGMENT = 1 << 20       # vmlinux notes are a few hundred bytes


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * 16),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64),
        ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64),
        ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64),
        ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64),
        ("p_align", ctypes.c_uint64),
    ]


class Elf64_Nhdr(ctypes.LittleEndianStructure):
    _fields_ = [("n_namesz", ctypes.c_uint32), ("n_descsz", ctypes.c_uint32),
                ("n_type", ctypes.c_uint32)]


@dataclass(frozen=True)
class _Segment:
    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


def is_elf(head: bytes) -> bool:
    return head[:4] == ELFMAG


def load_elf(mem: GuestMemory, img: ImageFile) -> KernelLoad:
    """Validate and load a vmlinux; see the module doc for the rules."""
    if img.size < ctypes.sizeof(Elf64_Ehdr):
        raise LoaderError(f"truncated ELF header: file is {img.size} bytes")
    ehdr = Elf64_Ehdr.from_buffer_copy(img.read_at(0, ctypes.sizeof(Elf64_Ehdr)))
    _check_ehdr(ehdr)
    phdrs = [Elf64_Phdr.from_buffer_copy(img.read_at(ehdr.e_phoff + i * ehdr.e_phentsize,
                                                     ctypes.sizeof(Elf64_Phdr)))
             for i in range(ehdr.e_phnum)]
    segments = _load_segments(phdrs, img.size)
    for seg in segments:
        check_fits(mem, seg.paddr, seg.paddr + seg.memsz, "ELF segment")
    entry = _entry_point(ehdr.e_entry, segments)
    pvh_entry = _pvh_entry(img, phdrs, segments)
    for seg in segments:
        copy_to_guest(img, mem, seg.paddr, seg.offset, seg.filesz)
        zero_guest(mem, seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    return KernelLoad(kind="elf", load_addr=segments[0].paddr,
                      kernel_end=max(s.paddr + s.memsz for s in segments), entry=entry,
                      pvh_entry=pvh_entry, setup_header=None,
                      initrd_addr_max=DEFAULT_INITRD_ADDR_MAX,
                      cmdline_max_len=CMDLINE_MAX_SIZE - 1)


def _check_ehdr(h: Elf64_Ehdr) -> None:
    ident = bytes(h.e_ident)
    checks = [
        (ident[:4] == ELFMAG, "bad ELF magic"),
        (ident[4] == ELFCLASS64, f"ELF class {ident[4]} is not ELFCLASS64"),
        (ident[5] == ELFDATA2LSB, f"ELF data encoding {ident[5]} is not little-endian"),
        (ident[6] == EV_CURRENT, f"ELF ident version {ident[6]} is not EV_CURRENT"),
        (h.e_type == ET_EXEC, f"ELF type {h.e_type} is not ET_EXEC"),
        (h.e_machine == EM_X86_64, f"ELF machine {h.e_machine} is not EM_X86_64"),
        (h.e_version == EV_CURRENT, f"ELF version {h.e_version} is not EV_CURRENT"),
        (h.e_phentsize == ctypes.sizeof(Elf64_Phdr),
         f"program header size {h.e_phentsize} is not {ctypes.sizeof(Elf64_Phdr)}"),
        (0 < h.e_phnum <= MAX_PHNUM and h.e_phnum != PN_XNUM,
         f"program header count {h.e_phnum} is not in 1..{MAX_PHNUM}"),
    ]
    for ok, why in checks:
        if not ok:
            raise LoaderError(f"not a loadable x86-64 vmlinux: {why}")


def _load_segments(phdrs: list[Elf64_Phdr], file_size: int) -> list[_Segment]:
    segments = []
    for i, p in enumerate(phdrs):
        if p.p_type != PT_LOAD or p.p_memsz == 0:
            continue
        if p.p_filesz > p.p_memsz:
            raise LoaderError(f"ELF segment {i}: file size {p.p_filesz:#x} exceeds "
                              f"memory size {p.p_memsz:#x}")
        if p.p_offset + p.p_filesz > file_size:
            raise LoaderError(f"ELF segment {i}: data {p.p_offset:#x}+{p.p_filesz:#x} "
                              f"runs past the end of the file ({file_size:#x})")
        segments.append(_Segment(p.p_offset, p.p_paddr, p.p_vaddr, p.p_filesz, p.p_memsz))
    if not segments:
        raise LoaderError("ELF image has no loadable segment")
    segments.sort(key=lambda s: s.paddr)
    for a, b in zip(segments, segments[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise LoaderError(f"ELF segments overlap at physical {b.paddr:#x}")
    return segments


def _entry_point(e_entry: int, segments: list[_Segment]) -> int:
    for s in segments:
        if s.paddr <= e_entry < s.paddr + s.memsz:
            return e_entry
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            return e_entry - s.vaddr + s.paddr
    raise LoaderError(f"ELF entry point {e_entry:#x} is outside every loaded segment")


def _pvh_entry(img: ImageFile, phdrs: list[Elf64_Phdr], segments: list[_Segment]) -> int | None:
    for p in phdrs:
        if p.p_type != PT_NOTE:
            continue
        if p.p_filesz > MAX_NOTE_SEGMENT:
            raise LoaderError(f"ELF note segment of {p.p_filesz:#x} bytes is implausibly large")
        # Notes in an ELF64 file are 4-byte aligned unless the segment says 8 (GNU property).
        align = 8 if p.p_align == 8 else 4
        for name, ntype, desc in _notes(img.read_at(p.p_offset, p.p_filesz), align):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return _check_pvh_entry(desc, segments)
    return None


def _notes(data: bytes, align: int):
    """Yield ``(name, type, desc)`` for each note; a malformed note is a LoaderError."""
    hsize = ctypes.sizeof(Elf64_Nhdr)
    pos = 0
    while pos + hsize <= len(data):
        n = Elf64_Nhdr.from_buffer_copy(data, pos)
        name_at = pos + hsize
        desc_at = name_at + _round(n.n_namesz, align)
        end = desc_at + _round(n.n_descsz, align)
        if desc_at + n.n_descsz > len(data):
            raise LoaderError(f"ELF note at {pos:#x} runs past its segment")
        yield (data[name_at:name_at + n.n_namesz].rstrip(b"\0"), n.n_type,
               data[desc_at:desc_at + n.n_descsz])
        pos = end


def _round(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _check_pvh_entry(desc: bytes, segments: list[_Segment]) -> int:
    if len(desc) not in (4, 8):
        raise LoaderError(f"Xen PHYS32_ENTRY note has a {len(desc)}-byte value")
    entry = int.from_bytes(desc, "little")
    if entry >= 1 << 32:
        raise LoaderError(f"PVH entry {entry:#x} is not a 32-bit address")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise LoaderError(f"PVH entry {entry:#x} is outside every loaded segment")
    return entry
