"""Initrd placement: as high as allowed, page-aligned, above the kernel, inside low RAM."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.loader import (
    DEFAULT_INITRD_ADDR_MAX, LoaderError, initrd_placement, load_initrd)
from asyncvmm.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30


def test_initrd_goes_to_the_top_of_ram_page_aligned():
    mem = GuestMemory.from_buffers([(0, bytearray(64 * MiB))])
    data = b"INITRD" * 1000 + b"!"
    r = load_initrd(mem, io.BytesIO(data), kernel_end=0x2000000)
    assert r.size == len(data)
    assert r.addr % 4096 == 0
    assert r.addr + r.size <= 64 * MiB < r.addr + r.size + 4096
    assert mem.read(r.addr, r.size) == data
    assert r.as_tuple() == (r.addr, r.size)


def test_initrd_addr_max_is_inclusive():
    # The highest byte may be initrd_addr_max itself.
    assert initrd_placement(0x1000, ram_end=GiB, kernel_end=0, initrd_addr_max=0x1FFFFFF) == 0x1FFF000


def test_elf_default_limit_applies_to_big_guests():
    addr = initrd_placement(5 * MiB, ram_end=3 * GiB, kernel_end=0x4000000)
    assert addr + 5 * MiB <= DEFAULT_INITRD_ADDR_MAX + 1
    assert addr == (DEFAULT_INITRD_ADDR_MAX + 1 - 5 * MiB) // 4096 * 4096


def test_large_guest_keeps_the_initrd_below_the_gap():
    # 6 GiB guest: low RAM ends at the MMIO gap, the rest is above 4 GiB and unused for initrd.
    low_end = layout.ram_layout(6 * GiB)[0][1]
    addr = initrd_placement(100 * MiB, ram_end=low_end, kernel_end=0x4000000, initrd_addr_max=(1 << 32) - 1)
    assert addr + 100 * MiB <= layout.MMIO32_START


def test_initrd_that_does_not_fit_is_refused():
    mem = GuestMemory.from_buffers([(0, bytearray(8 * MiB))])
    with pytest.raises(LoaderError, match="does not fit"):
        load_initrd(mem, io.BytesIO(bytes(7 * MiB)), kernel_end=0x200000)


def test_initrd_must_stay_above_the_kernel():
    assert initrd_placement(0x3000, ram_end=0x10000000, kernel_end=0x9FFD000,
                            initrd_addr_max=0x9FFFFFF) == 0x9FFD000
    with pytest.raises(LoaderError, match="kernel's end"):
        initrd_placement(0x3000, ram_end=0x10000000, kernel_end=0x9FFD001, initrd_addr_max=0x9FFFFFF)


def test_empty_initrd_is_refused():
    with pytest.raises(LoaderError, match="empty"):
        load_initrd(GuestMemory.from_buffers([(0, bytearray(8 * MiB))]), io.BytesIO(b""), kernel_end=0)


def test_initrd_from_a_path(tmp_path):
    (tmp_path / "initrd").write_bytes(b"070701" * 100)
    mem = GuestMemory.from_buffers([(0, bytearray(8 * MiB))])
    r = load_initrd(mem, tmp_path / "initrd", kernel_end=2 * MiB)
    assert mem.read(r.addr, 6) == b"070701"


@given(size=st.integers(1, 1 << 34), ram_end=st.integers(1, 1 << 32),
       kernel_end=st.integers(0, 1 << 32), addr_max=st.integers(0, (1 << 32) - 1))
def test_placement_invariants(size, ram_end, kernel_end, addr_max):
    try:
        addr = initrd_placement(size, ram_end=ram_end, kernel_end=kernel_end, initrd_addr_max=addr_max)
    except LoaderError:
        # Refused only when no page-aligned slot exists between the kernel and the ceiling.
        top = min(addr_max + 1, ram_end)
        assert (top - size) // 4096 * 4096 < -(-kernel_end // 4096) * 4096
        return
    assert addr % 4096 == 0
    assert addr >= kernel_end
    assert addr + size <= min(addr_max + 1, ram_end)
    # As high as possible: one more page up would cross the ceiling.
    assert addr + 4096 + size > min(addr_max + 1, ram_end)
