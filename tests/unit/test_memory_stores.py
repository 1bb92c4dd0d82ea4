"""Guest-visible fields are written with one store, never zeroed first.

struct.pack_into clears a field before writing it; a guest polling that
field on another CPU can then read 0. A reader process samples the field
while this process rewrites it with values that are never 0.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct

import pytest

from asyncvmm.memory import GuestMemory, store_u16, store_u32


def _reader(buf, offset, fmt, n, out):
    zeros = 0
    view = memoryview(buf)
    for _ in range(n):
        if struct.unpack_from(fmt, view, offset)[0] == 0:
            zeros += 1
    out.put(zeros)


@pytest.mark.parametrize("store,fmt,top", [(store_u16, "<H", 0xFFFF), (store_u32, "<I", 0xFFFF_FFFF)])
def test_concurrent_reader_never_sees_a_zeroed_field(store, fmt, top):
    buf = mmap.mmap(-1, 4096)
    store(buf, 2, 1)
    out = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=_reader, args=(buf, 2, fmt, 300_000, out))
    p.start()
    value = 1
    while p.is_alive():
        for _ in range(20_000):
            value = value % top + 1          # 1..top, never 0
            store(buf, 2, value)
    assert out.get(timeout=30) == 0
    p.join()


def test_guest_memory_integer_writes_round_trip_and_reject_overflow():
    mem = GuestMemory.from_buffers([(0x1000, bytearray(64))])
    mem.write_u16(0x1001, 0xBEEF)          # unaligned is fine
    mem.write_u32(0x1004, 0xDEADBEEF)
    mem.write_u64(0x1008, 0x0123456789ABCDEF)
    mem.write_u8(0x1010, 0xAB)
    assert mem.read_u16(0x1001) == 0xBEEF
    assert mem.read_u32(0x1004) == 0xDEADBEEF
    assert mem.read_u64(0x1008) == 0x0123456789ABCDEF
    assert mem.read_u8(0x1010) == 0xAB
    with pytest.raises(OverflowError):
        mem.write_u16(0x1000, 0x10000)
