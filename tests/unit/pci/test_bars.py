"""BarSpace: the VMM's placements in the 64-bit window and the checks on where a guest moves a BAR."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.pci.bars import BarAllocationError, BarSpace

GiB = 1 << 30
MMIO32 = (0xC100_0000, 0xEEC0_0000 - 0xC100_0000)
MMIO64 = (256 * GiB, 256 * GiB)


def _space():
    return BarSpace([MMIO32, MMIO64])


def test_allocate_first_fit_naturally_aligned():
    s = _space()
    a = s.allocate(0x8000)
    b = s.allocate(0x8000)
    c = s.allocate(0x1000)
    d = s.allocate(0x10000)
    assert (a, b, c, d) == (MMIO64[0], MMIO64[0] + 0x8000, MMIO64[0] + 0x10000, MMIO64[0] + 0x20000)
    s.free(b, 0x8000)
    assert s.allocate(0x8000) == b                       # the hole is reused
    assert s.allocate(0x4000) == MMIO64[0] + 0x14000     # after c, aligned


def test_allocate_aligns_a_window_that_is_not():
    s = BarSpace([(0x1000, 0x10_0000)])
    assert s.allocate(0x8000) == 0x8000
    assert s.allocate(0x1000) == 0x1000


def test_allocate_exhaustion_and_bad_sizes():
    s = BarSpace([(0x10000, 0x10000)])
    assert [s.allocate(0x4000) for _ in range(4)] == [0x10000, 0x14000, 0x18000, 0x1C000]
    with pytest.raises(BarAllocationError):
        s.allocate(0x10)
    for bad in (0, 0x3000, -16):
        with pytest.raises(ValueError):
            s.allocate(bad)


def test_free_refuses_what_was_not_allocated():
    s = _space()
    a = s.allocate(0x8000)
    with pytest.raises(ValueError):
        s.free(a, 0x4000)
    with pytest.raises(ValueError):
        s.free(a + 0x8000, 0x8000)
    s.free(a, 0x8000)
    with pytest.raises(ValueError):
        s.free(a, 0x8000)


def test_allocate_avoids_guest_mappings():
    s = _space()
    s.claim("guest-moved", MMIO64[0], 0x8000)
    assert s.allocate(0x8000) == MMIO64[0] + 0x8000


def test_check_alignment_windows_and_ram():
    s = _space()
    dev = object()
    assert s.check(dev, MMIO64[0], 0x8000) is None
    assert s.check(dev, 0xC100_0000, 0x8000) is None                   # the 32-bit window is fine too
    assert s.check(dev, 0xEEA0_0000, 0x20_0000) is None                # ends at the window's end
    assert "aligned" in s.check(dev, MMIO64[0] + 0x4000, 0x8000)
    assert "outside" in s.check(dev, 0x10_0000, 0x8000)                # over RAM
    assert "outside" in s.check(dev, 0xEEC0_0000, 0x8000)              # over the ECAM range
    assert "outside" in s.check(dev, 0xC100_0000 - 0x8000, 0x8000)
    assert "outside" in s.check(dev, MMIO64[0] + MMIO64[1], 0x8000)
    assert "outside" in s.check(dev, 0xEE80_0000, 0x80_0000)           # straddles the window's end
    assert "power of two" in s.check(dev, MMIO64[0], 0x3000)


def test_two_adjacent_windows_do_not_make_one():
    s = BarSpace([(0x1_0000, 0x1_0000), (0x2_0000, 0x1_0000)])
    assert "outside" in s.check(object(), 0x0, 0x4_0000)
    s2 = BarSpace([(0x0, 0x1_0000), (0x1_0000, 0x1_0000)])
    assert "outside" in s2.check(object(), 0x0, 0x2_0000)               # aligned, spans both


def test_claims_and_other_owners():
    s = _space()
    a, b = object(), object()
    base = MMIO64[0]
    s.claim(a, base, 0x8000)
    assert s.check(a, base, 0x8000) is None                            # its own mapping
    assert "overlaps" in s.check(b, base, 0x8000)
    assert "overlaps" in s.check(b, base, 0x10000)                     # larger, covering it
    assert s.check(b, base + 0x8000, 0x8000) is None                   # adjacent
    with pytest.raises(ValueError, match="overlaps"):
        s.claim(b, base + 0x4000, 0x4000)
    s.claim(b, base + 0x8000, 0x8000)
    assert s.mappings(a) == [(base, 0x8000)]
    s.release(a)
    assert s.mappings(a) == []
    assert s.check(b, base, 0x8000) is None
    assert s.mappings(b) == [(base + 0x8000, 0x8000)]


def test_claim_refuses_outside_windows():
    s = _space()
    with pytest.raises(ValueError, match="outside"):
        s.claim(object(), 0, 0x1000)


@pytest.mark.parametrize("windows", [[], [(0, 0)], [(0, 0x2000), (0x1000, 0x2000)]])
def test_bad_windows(windows):
    with pytest.raises(ValueError):
        BarSpace(windows)


@given(ops=st.lists(st.tuples(st.booleans(), st.integers(4, 16)), max_size=40))
def test_allocations_never_overlap_and_stay_aligned(ops):
    s = BarSpace([(0x1_0000, 0x10_0000), (0x100_0000, 0x4_0000)])
    live: list[tuple[int, int]] = []
    for alloc, shift in ops:
        if alloc or not live:
            size = 1 << shift
            try:
                addr = s.allocate(size)
            except BarAllocationError:
                continue
            assert addr % size == 0
            assert 0x100_0000 <= addr and addr + size <= 0x104_0000
            assert all(addr + size <= a or a + n <= addr for a, n in live)
            live.append((addr, size))
        else:
            s.free(*live.pop(shift % len(live)))
