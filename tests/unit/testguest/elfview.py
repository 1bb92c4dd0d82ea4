"""A minimal, independent ELF64 reader for checking the test guest images.

Deliberately not shared with asyncvmm's loader or build.py, so that the tests
check the files against the ELF specification rather than against the code
that produced or consumes them.
"""

from __future__ import annotations

import dataclasses
import struct

PT_LOAD = 1
PT_NOTE = 4


@dataclasses.dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclasses.dataclass(frozen=True)
class Elf:
    data: bytes
    ident: bytes
    type: int
    machine: int
    entry: int
    segments: list[Segment]

    def notes(self) -> list[tuple[bytes, int, bytes, int]]:
        """``(name, type, desc, segment_align)`` of every note in every PT_NOTE."""
        out = []
        for seg in self.segments:
            if seg.type != PT_NOTE:
                continue
            blob = self.data[seg.offset:seg.offset + seg.filesz]
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
                name_at = pos + 12
                desc_at = name_at + (namesz + 3) // 4 * 4
                out.append((blob[name_at:name_at + namesz].rstrip(b"\0"), ntype,
                            blob[desc_at:desc_at + descsz], seg.align))
                pos = desc_at + (descsz + 3) // 4 * 4
        return out

    def bytes_at(self, paddr: int, length: int) -> bytes:
        """File bytes that a loader puts at guest-physical ``paddr``."""
        for seg in self.segments:
            if seg.type == PT_LOAD and seg.paddr <= paddr and paddr + length <= seg.paddr + seg.filesz:
                start = seg.offset + paddr - seg.paddr
                return self.data[start:start + length]
        raise KeyError(f"{paddr:#x} is not in the file image of any PT_LOAD")


def parse_elf(data: bytes) -> Elf:
    ident = data[:16]
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    segments = []
    for i in range(e_phnum):
        p = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        segments.append(Segment(type=p[0], offset=p[2], vaddr=p[3], paddr=p[4],
                                filesz=p[5], memsz=p[6], align=p[7]))
    return Elf(data, ident, e_type, e_machine, e_entry, segments)


# struct setup_header, Documentation/arch/x86/boot.rst
SETUP_HEADER = {
    "setup_sects": (0x1F1, "B"), "syssize": (0x1F4, "I"), "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"), "header": (0x202, "4s"), "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"), "loadflags": (0x211, "B"), "code32_start": (0x214, "I"),
    "kernel_alignment": (0x230, "I"), "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"), "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}


def parse_setup_header(image: bytes) -> dict[str, int | bytes]:
    return {name: struct.unpack_from("<" + fmt, image, off)[0]
            for name, (off, fmt) in SETUP_HEADER.items()}
