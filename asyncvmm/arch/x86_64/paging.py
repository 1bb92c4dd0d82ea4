"""Identity page tables for entering a kernel in long mode, and the control-register values.

Primer.  With CR4.PAE and EFER.LME, a 48-bit virtual address walks four
levels; stopping at the page directory with PS=1 maps 2 MiB pages.  One
PML4 entry -> one PDPT whose first four entries -> four page directories of
512 entries each = 2048 x 2 MiB = 0..4 GiB, virtual == physical.  The
Linux 64-bit boot protocol needs the kernel, zero page and command line
identity-mapped; Linux then builds its own tables.

Every entry sets U/S as well as P and R/W: a minimal test guest that drops
to ring 3 at once keeps using these tables, and the bit costs a kernel
nothing (it replaces the tables before user space exists).

The vCPU code (not this module) sets, for the 64-bit entry::

    CR3  = write_identity_page_tables(mem)
    CR4  = LONG_MODE_CR4            (PAE)
    EFER = LONG_MODE_EFER           (LME | LMA)
    CR0  = LONG_MODE_CR0            (PE | ET | PG)

and for a PVH entry (32-bit protected mode, paging off, per Xen's pvh doc)
CR0 = PVH_CR0 (PE only), CR4 = 0, EFER = 0.
"""

from __future__ import annotations

import struct

from asyncvmm.arch.x86_64 import layout
from asyncvmm.memory import GuestMemory

# Control-register bits, named as in arch/x86/include/uapi/asm/processor-flags.h.
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4              # hard-wired to 1 on every CPU since the 486; stated for clarity
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8                # arch/x86/include/asm/msr-index.h: _EFER_LME
EFER_LMA = 1 << 10

LONG_MODE_CR0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
LONG_MODE_CR4 = X86_CR4_PAE
# KVM_SET_SREGS takes EFER as the CPU would show it with paging on, so LMA too.
LONG_MODE_EFER = EFER_LME | EFER_LMA
PVH_CR0 = X86_CR0_PE

# Page-table entry bits (arch/x86/include/asm/pgtable_types.h names).
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PSE = 1 << 7               # in a PDE: this entry maps a 2 MiB page
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
_PAGE_LARGE = _PAGE_TABLE | _PAGE_PSE

PAGE_SIZE = 0x1000
PMD_SIZE = 2 << 20               # one PDE maps 2 MiB
PUD_SIZE = 1 << 30               # one PDPT entry covers 1 GiB
ENTRIES_PER_TABLE = 512
IDENTITY_MAP_SIZE = 4 << 30
PD_COUNT = IDENTITY_MAP_SIZE // PUD_SIZE


def identity_page_tables() -> list[tuple[int, bytes]]:
    """``(guest_addr, page)`` for the PML4, the PDPT and the page directories."""
    pml4 = struct.pack("<Q", layout.PDPTE_START | _PAGE_TABLE).ljust(PAGE_SIZE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (layout.PDE_START + i * PAGE_SIZE) | _PAGE_TABLE)
                    for i in range(PD_COUNT)).ljust(PAGE_SIZE, b"\0")
    pages = [(layout.PML4_START, pml4), (layout.PDPTE_START, pdpt)]
    for i in range(PD_COUNT):
        first = i * ENTRIES_PER_TABLE
        pd = struct.pack(f"<{ENTRIES_PER_TABLE}Q", *(((first + j) * PMD_SIZE) | _PAGE_LARGE
                                                     for j in range(ENTRIES_PER_TABLE)))
        pages.append((layout.PDE_START + i * PAGE_SIZE, pd))
    return pages


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Write the identity map of 0..4 GiB into guest memory; return the CR3 value."""
    for gpa, page in identity_page_tables():
        mem.write(gpa, page)
    return layout.PML4_START
