"""Boot GDT: descriptor packing, the selectors Linux and PVH expect, matching kvm_segment values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.gdt import (
    BOOT_CS, BOOT_DS, BOOT_GDT, PVH_CS, gdt_entry, kvm_segment_from_gdt, long_mode_segments,
    pvh_segments, write_boot_gdt)
from asyncvmm.memory import GuestMemory


def test_flat_descriptors_have_their_well_known_encodings():
    # The textbook values for flat 4 GiB segments (Intel SDM vol. 3 3.4.5 bit layout).
    assert gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF   # 64-bit code
    assert gdt_entry(0xC09B, 0, 0xFFFFF) == 0x00CF9B000000FFFF   # 32-bit code
    assert gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF   # data
    assert gdt_entry(0x808B, 0x12345678, 0x67) == 0x12808B3456780067


@given(access=st.integers(0, 0xFF), nibble=st.integers(0, 0xF), base=st.integers(0, (1 << 32) - 1),
       limit=st.integers(0, 0xFFFFF))
def test_decode_inverts_encode(access, nibble, base, limit):
    seg = kvm_segment_from_gdt(gdt_entry(nibble << 12 | access, base, limit), 0x28)
    assert seg.base == base and seg.selector == 0x28
    assert (seg.type, seg.s, seg.dpl, seg.present) == (access & 0xF, access >> 4 & 1, access >> 5 & 3, access >> 7)
    assert (seg.avl, seg.l, seg.db, seg.g) == (nibble & 1, nibble >> 1 & 1, nibble >> 2 & 1, nibble >> 3)
    assert seg.limit == ((limit << 12 | 0xFFF) if seg.g else limit)


@pytest.mark.parametrize("flags, base, limit", [(0x0100, 0, 0), (0x1_0000, 0, 0), (0x9B, 1 << 32, 0),
                                                (0x9B, 0, 0x100000), (0x9B, -1, 0)])
def test_gdt_entry_rejects_out_of_range_inputs(flags, base, limit):
    with pytest.raises(ValueError):
        gdt_entry(flags, base, limit)


def test_linux_64bit_boot_protocol_selectors():
    segs = long_mode_segments()
    assert (BOOT_CS, BOOT_DS) == (0x10, 0x18)          # __BOOT_CS, __BOOT_DS in boot.rst
    cs, ds = segs.cs, segs.data
    assert (cs.selector, cs.type, cs.s, cs.present, cs.dpl, cs.l, cs.db, cs.g) == (0x10, 0xB, 1, 1, 0, 1, 0, 1)
    assert (cs.base, cs.limit) == (0, 0xFFFFFFFF)
    assert (ds.selector, ds.type, ds.s, ds.present, ds.db, ds.g, ds.l) == (0x18, 0x3, 1, 1, 1, 1, 0)
    assert (ds.base, ds.limit) == (0, 0xFFFFFFFF)


def test_pvh_segments_are_flat_32bit():
    segs = pvh_segments()
    assert (segs.cs.selector, segs.cs.type, segs.cs.db, segs.cs.l) == (PVH_CS, 0xB, 1, 0)
    assert (segs.cs.base, segs.cs.limit) == (0, 0xFFFFFFFF)
    assert (segs.data.selector, segs.data.type, segs.data.db) == (BOOT_DS, 0x3, 1)


@pytest.mark.parametrize("segs", [long_mode_segments(), pvh_segments()])
def test_tr_is_a_busy_tss_of_architectural_size(segs):
    tr = segs.tr
    assert (tr.type, tr.s, tr.present, tr.base, tr.limit, tr.g, tr.unusable) == (0xB, 0, 1, 0, 0x67, 0, 0)
    assert tr.selector & 4 == 0                       # TI=0: a GDT selector


def test_hidden_state_matches_the_table_in_memory():
    mem = GuestMemory.from_buffers([(0, bytearray(0x10000))])
    base, limit = write_boot_gdt(mem)
    assert (base, limit) == (layout.GDT_START, len(BOOT_GDT) * 8 - 1)
    assert base + limit < layout.IDT_START             # the table ends before the IDT slot
    assert mem.read_u64(layout.GDT_START) == 0
    for seg in (*vars(long_mode_segments()).values(), *vars(pvh_segments()).values()):
        if seg.s:                                      # code/data: rebuilt from the bytes in memory
            assert kvm_segment_from_gdt(mem.read_u64(base + seg.selector), seg.selector) == seg
