"""Decoding kvm_run: the memoryview fast path for MMIO agrees with the ctypes decode."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.kvm import exits as x
from asyncvmm.kvm.structs import kvm_run


@pytest.fixture
def page():
    # The map closes when the last ctypes struct and view on it are gone.
    m = mmap.mmap(-1, mmap.PAGESIZE)
    return kvm_run.from_buffer(m), memoryview(m)


@given(addr=st.integers(0, 2**64 - 1), length=st.integers(0, 2**32 - 1), is_write=st.integers(0, 255),
       data=st.binary(min_size=8, max_size=8))
def test_mmio_exits_decode_the_same_both_ways(addr, length, is_write, data):
    m = mmap.mmap(-1, mmap.PAGESIZE)
    run, view = kvm_run.from_buffer(m), memoryview(m)
    run.exit_reason = x.KVM_EXIT_MMIO
    mmio = run.exit.mmio
    mmio.phys_addr, mmio.len, mmio.is_write = addr, length, is_write
    mmio.data[:] = list(data)
    slow, fast = x.decode_exit(run), x.decode_exit(run, view)
    assert type(slow) is type(fast)
    assert (fast.addr, fast.data if is_write else fast.size) == \
           (slow.addr, slow.data if is_write else slow.size)


def test_an_mmio_read_answered_through_the_view_lands_in_the_page(page):
    run, view = page
    run.exit_reason = x.KVM_EXIT_MMIO
    run.exit.mmio.phys_addr, run.exit.mmio.len, run.exit.mmio.is_write = 0xC000_1060, 2, 0
    exit_ = x.decode_exit(run, view)
    assert exit_ == x.MmioRead(0xC000_1060, 2, run, view)
    exit_.complete(b"\x05")                                 # short answers are padded with 0xff
    assert bytes(run.exit.mmio.data[:2]) == b"\x05\xff"


def test_other_exits_still_take_the_ctypes_decode(page):
    run, view = page
    run.exit_reason = x.KVM_EXIT_HLT
    assert x.decode_exit(run, view) == x.Hlt()
