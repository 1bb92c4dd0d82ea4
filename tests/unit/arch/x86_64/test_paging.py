"""Identity page tables: walk them like the MMU and check every 2 MiB page maps to itself."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.paging import (
    EFER_LMA, EFER_LME, LONG_MODE_CR0, LONG_MODE_CR4, LONG_MODE_EFER, PVH_CR0, X86_CR0_PE,
    X86_CR0_PG, X86_CR4_PAE, identity_page_tables, write_identity_page_tables)
from asyncvmm.memory import GuestMemory

P, RW, US, PS = 1, 2, 4, 0x80
ADDR_MASK = 0x000F_FFFF_FFFF_F000


@pytest.fixture(scope="module")
def mem_cr3():
    mem = GuestMemory.from_buffers([(0, bytearray(0x20000))])
    return mem, write_identity_page_tables(mem)


class NotMapped(Exception):
    pass


def walk(mem: GuestMemory, cr3: int, va: int) -> tuple[int, list[int]]:
    """Translate ``va`` through 4-level paging; return the physical address and the entries used."""
    pml4e = mem.read_u64((cr3 & ADDR_MASK) + ((va >> 39) & 0x1FF) * 8)
    if not pml4e & P:
        raise NotMapped(va)
    pdpte = mem.read_u64((pml4e & ADDR_MASK) + ((va >> 30) & 0x1FF) * 8)
    if not pdpte & P:
        raise NotMapped(va)
    assert not pdpte & PS, "no 1 GiB pages expected"
    pde = mem.read_u64((pdpte & ADDR_MASK) + ((va >> 21) & 0x1FF) * 8)
    if not pde & P:
        raise NotMapped(va)
    assert pde & PS, "2 MiB pages expected"
    return (pde & 0x000F_FFFF_FFE0_0000) | (va & 0x1F_FFFF), [pml4e, pdpte, pde]


def test_cr3_is_the_pml4(mem_cr3):
    assert mem_cr3[1] == layout.PML4_START


def test_every_2mib_page_below_4gib_maps_to_itself_with_user_access(mem_cr3):
    mem, cr3 = mem_cr3
    for page in range(0, 1 << 32, 2 << 20):
        pa, entries = walk(mem, cr3, page + 0x1234)
        assert pa == page + 0x1234
        assert all(e & (P | RW | US) == P | RW | US for e in entries)


@given(st.integers(0, (1 << 32) - 1))
def test_any_address_below_4gib_is_identity(va):
    mem = GuestMemory.from_buffers([(0, bytearray(0x20000))])
    cr3 = write_identity_page_tables(mem)
    assert walk(mem, cr3, va)[0] == va


@pytest.mark.parametrize("va", [1 << 32, (1 << 32) + 0x1000, 1 << 39, (1 << 47) - 1])
def test_nothing_above_4gib_is_mapped(mem_cr3, va):
    with pytest.raises(NotMapped):
        walk(*mem_cr3, va)


def test_tables_stay_clear_of_the_other_boot_structures():
    pages = identity_page_tables()
    assert [gpa for gpa, _ in pages] == [layout.PML4_START, layout.PDPTE_START] + \
        [layout.PDE_START + i * 0x1000 for i in range(4)]
    assert all(len(page) == 0x1000 for _, page in pages)
    lo, hi = layout.PML4_START, layout.PDE_START + 4 * 0x1000
    for other, size in [(layout.GDT_START, 0x20), (layout.PVH_INFO_START, 0x1000),
                        (layout.ZERO_PAGE_START, 0x1000), (layout.CMDLINE_START, layout.CMDLINE_MAX_SIZE)]:
        assert other + size <= lo or other >= hi
    assert layout.BOOT_STACK_POINTER <= lo


def test_control_register_values_for_long_mode_and_pvh():
    assert LONG_MODE_CR0 & (X86_CR0_PE | X86_CR0_PG) == X86_CR0_PE | X86_CR0_PG
    assert LONG_MODE_CR4 & X86_CR4_PAE
    assert LONG_MODE_EFER == EFER_LME | EFER_LMA == 0x500
    assert PVH_CR0 == X86_CR0_PE                # paging off, everything else clear (Xen pvh doc)
