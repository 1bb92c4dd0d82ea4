"""The boot GDT and the matching ``kvm_segment`` values.

Primer.  A segment descriptor is 8 bytes: limit[15:0], base[23:0], an
access byte (type, S, DPL, P), limit[19:16], a flags nibble (AVL, L, D/B,
G) and base[31:24].  :func:`gdt_entry` takes ``flags`` as 16 bits laid out
as in the descriptor's bytes 5..6: bits 0-7 the access byte, bits 12-15
the flags nibble (so 0xA09B is G=1 L=1 P=1 S=1 type=0xB).

The vCPU must load the hidden part of each segment register itself
(``KVM_SET_SREGS``); :func:`kvm_segment_from_gdt` derives those values from
the very descriptor written to guest memory, so the two never disagree.

One table serves both boot protocols (the layout leaves 4 slots, 0x500..0x520):

    0x00 null
    0x08 32-bit flat code      PVH: CS ("32-bit read/execute, base 0, limit 4 GiB")
    0x10 64-bit code           Linux 64-bit boot protocol: __BOOT_CS
    0x18 flat read/write data  __BOOT_DS; PVH: DS, ES, SS

boot.rst requires CS = __BOOT_CS (0x10) and DS/ES/SS = __BOOT_DS (0x18).
There is no room for a TSS descriptor, and none is needed: both protocols
only need TR's hidden state to be a valid busy TSS (PVH: base 0, limit
0x67), and each kernel loads its own TSS before anything reads the old one.
:func:`boot_tr` gives that state with selector 0 (TI=0, as KVM's own reset
state has).  Nothing here touches vCPU registers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from asyncvmm.arch.x86_64 import layout
from asyncvmm.memory import GuestMemory

# Descriptor flags as (flags nibble << 12) | access byte.
GDT_FLAGS_CODE64 = 0xA09B        # G, L; P, S, execute/read accessed
GDT_FLAGS_CODE32 = 0xC09B        # G, D; P, S, execute/read accessed
GDT_FLAGS_DATA = 0xC093          # G, B; P, S, read/write accessed

FLAT_LIMIT = 0xFFFFF             # 20-bit limit; with G=1 it spans 4 GiB

PVH_CS = 0x08
BOOT_CS = 0x10                   # Linux __BOOT_CS
BOOT_DS = 0x18                   # Linux __BOOT_DS
TSS_TYPE_BUSY = 0xB              # busy 32-bit TSS (in long mode: busy 64-bit TSS)
TSS_LIMIT = 0x67                 # 104 bytes, the architectural TSS size


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a segment descriptor from ``flags`` (see module doc), a 32-bit base and a 20-bit limit."""
    if not 0 <= flags <= 0xF0FF or flags & 0x0F00:
        raise ValueError(f"descriptor flags {flags:#x} must be access byte | nibble << 12")
    if not 0 <= base < 1 << 32:
        raise ValueError(f"descriptor base {base:#x} exceeds 32 bits")
    if not 0 <= limit <= FLAT_LIMIT:
        raise ValueError(f"descriptor limit {limit:#x} exceeds 20 bits")
    return ((base & 0xFF00_0000) << 32 | (flags & 0xF0FF) << 40 | (limit & 0xF_0000) << 32
            | (base & 0x00FF_FFFF) << 16 | (limit & 0xFFFF))


BOOT_GDT: tuple[int, ...] = (
    0,
    gdt_entry(GDT_FLAGS_CODE32, 0, FLAT_LIMIT),
    gdt_entry(GDT_FLAGS_CODE64, 0, FLAT_LIMIT),
    gdt_entry(GDT_FLAGS_DATA, 0, FLAT_LIMIT),
)


@dataclass(frozen=True)
class KvmSegment:
    """The fields of ``struct kvm_segment``, ready to copy; ``limit`` is in bytes."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 -- the kernel's field name
    g: int
    avl: int
    unusable: int = 0


def kvm_segment_from_gdt(entry: int, selector: int) -> KvmSegment:
    """Decode a descriptor into the hidden segment state that matches it."""
    base = (entry >> 16 & 0xFF_FFFF) | (entry >> 32 & 0xFF00_0000)
    raw_limit = (entry & 0xFFFF) | (entry >> 32 & 0xF_0000)
    g = entry >> 55 & 1
    # KVM takes the limit in bytes: with G=1 the 20-bit limit counts 4 KiB pages.
    limit = raw_limit << 12 | 0xFFF if g else raw_limit
    return KvmSegment(base=base, limit=limit, selector=selector, type=entry >> 40 & 0xF,
                      present=entry >> 47 & 1, dpl=entry >> 45 & 3, db=entry >> 54 & 1,
                      s=entry >> 44 & 1, l=entry >> 53 & 1, g=g, avl=entry >> 52 & 1)


def boot_segment(selector: int) -> KvmSegment:
    """Hidden state for ``selector`` in :data:`BOOT_GDT`."""
    index = selector >> 3
    if selector & 7 or not 0 < index < len(BOOT_GDT):
        raise ValueError(f"selector {selector:#x} is not a boot GDT segment")
    return kvm_segment_from_gdt(BOOT_GDT[index], selector)


def boot_tr() -> KvmSegment:
    """TR for either protocol: a busy TSS at 0 with the architectural limit (see module doc)."""
    return KvmSegment(base=0, limit=TSS_LIMIT, selector=0, type=TSS_TYPE_BUSY, present=1,
                      dpl=0, db=0, s=0, l=0, g=0, avl=0)


@dataclass(frozen=True)
class BootSegments:
    """What the vCPU loads: CS, one data segment for DS/ES/FS/GS/SS, and TR."""

    cs: KvmSegment
    data: KvmSegment
    tr: KvmSegment


def long_mode_segments() -> BootSegments:
    """Segments for the Linux 64-bit boot protocol (CS=__BOOT_CS, data=__BOOT_DS)."""
    return BootSegments(cs=boot_segment(BOOT_CS), data=boot_segment(BOOT_DS), tr=boot_tr())


def pvh_segments() -> BootSegments:
    """Segments for a PVH entry: flat 32-bit code and data."""
    return BootSegments(cs=boot_segment(PVH_CS), data=boot_segment(BOOT_DS), tr=boot_tr())


def write_boot_gdt(mem: GuestMemory, addr: int = layout.GDT_START) -> tuple[int, int]:
    """Write :data:`BOOT_GDT` at ``addr``; return ``(base, limit)`` for the GDTR."""
    table = struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)
    mem.write(addr, table)
    return addr, len(table) - 1
