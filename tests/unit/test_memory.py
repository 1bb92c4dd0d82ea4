"""GuestMemory: every access inside RAM works, every other access is a GuestMemoryError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.memory import GuestMemory, GuestMemoryError

LOW, HIGH_BASE, HIGH = 0x10000, 0x40000, 0x8000


def two_regions() -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(LOW)), (HIGH_BASE, bytearray(HIGH))])


def in_ram(gpa: int, length: int) -> bool:
    return (0 <= gpa and gpa + length <= LOW) or (HIGH_BASE <= gpa and gpa + length <= HIGH_BASE + HIGH)


@given(st.integers(-16, HIGH_BASE + HIGH + 16), st.integers(0, 64))
def test_read_write_inside_a_region_or_error(gpa, length):
    mem = two_regions()
    data = bytes(range(length % 256)) + bytes(length - length % 256)
    if in_ram(gpa, length):
        mem.write(gpa, data)
        assert mem.read(gpa, length) == data
        assert bytes(mem.view(gpa, length)) == data
    else:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, data)
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)


@given(st.integers(-16, HIGH_BASE + HIGH + 16))
def test_unpack_reads_a_struct_inside_a_region_or_errors(gpa):
    mem, fmt = two_regions(), struct.Struct("<IIQ")
    if in_ram(gpa, fmt.size):
        mem.write(gpa, fmt.pack(1, 2, 3))
        assert mem.unpack(fmt, gpa) == (1, 2, 3)
    else:
        with pytest.raises(GuestMemoryError):
            mem.unpack(fmt, gpa)


@pytest.mark.parametrize("gpa,size", [(LOW - 2, 4), (LOW, 1), (HIGH_BASE - 1, 2), (HIGH_BASE + HIGH - 1, 2),
                                      (-1, 1), (1 << 64, 1)])
def test_integer_accesses_across_or_outside_ram_fail(gpa, size):
    mem = two_regions()
    read = {1: mem.read_u8, 2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}[size]
    with pytest.raises(GuestMemoryError):
        read(gpa)


def test_negative_length_is_an_error():
    with pytest.raises(GuestMemoryError):
        two_regions().read(0, -1)


def test_views_span_adjacent_regions_but_not_holes():
    mem = GuestMemory.from_buffers([(0, bytearray(b"a" * 16)), (16, bytearray(b"b" * 16))])
    assert b"".join(bytes(v) for v in mem.views(8, 16)) == b"a" * 8 + b"b" * 8
    with pytest.raises(GuestMemoryError):
        mem.view(8, 16)                      # one view cannot span two regions
    holey = two_regions()
    with pytest.raises(GuestMemoryError):
        list(holey.views(LOW - 4, 8))


def test_overlapping_regions_are_refused():
    with pytest.raises(ValueError):
        GuestMemory.from_buffers([(0, bytearray(32)), (16, bytearray(32))])


def test_large_guest_layout_leaves_the_mmio_gap_out_of_ram():
    layout_ = layout.ram_layout(4 << 30)
    assert layout_ == [(0, layout.MMIO32_START), (1 << 32, (4 << 30) - layout.MMIO32_START)]
    assert layout.ram_layout(128 << 20) == [(0, 128 << 20)]
    with pytest.raises(ValueError):
        layout.ram_layout(0)


def test_anonymous_memory_registers_host_addresses_and_closes():
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    assert mem.regions[0].host_addr != 0
    mem.write_u32(0x100, 0xCAFEBABE)
    assert mem.read_u32(0x100) == 0xCAFEBABE
    assert mem.total_size == 1 << 20 and mem.end == 1 << 20
    mem.close()


def _vm_flags(buf) -> set[str]:
    """The VmFlags of the mapping that holds ``buf``'s first byte (from /proc/self/smaps)."""
    import ctypes as _ctypes
    addr = _ctypes.addressof(_ctypes.c_char.from_buffer(buf))
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError("mapping not found in smaps")


def _host_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_guest_larger_than_host_ram_is_mapped_noreserve():
    # Firecracker maps guest RAM with MAP_NORESERVE and starts; so does asyncvmm: twice the
    # host's RAM is mapped (nothing touched, nothing reserved) instead of failing with ENOMEM.
    size = 2 * _host_ram_bytes() + (1 << 30)
    mem = GuestMemory.anonymous([(0, size)], mergeable=False)
    try:
        region = mem.regions[0]
        assert region.size == size
        assert "nr" in _vm_flags(region.buffer)          # nr = VM_NORESERVE
        assert "mg" not in _vm_flags(region.buffer)
        mem.write_u64(size - 8, 0x1122334455667788)       # one page at the far end is backed on touch
        assert mem.read_u64(size - 8) == 0x1122334455667788
    finally:
        mem.close()


def test_ksm_is_an_opt_in(monkeypatch):
    monkeypatch.delenv("ASYNCVMM_KSM", raising=False)
    plain = GuestMemory.anonymous([(0, 1 << 20)])
    monkeypatch.setenv("ASYNCVMM_KSM", "1")
    merged = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        assert "mg" not in _vm_flags(plain.regions[0].buffer)
        assert "mg" in _vm_flags(merged.regions[0].buffer)   # mg = VM_MERGEABLE
        assert "mg" not in _vm_flags(GuestMemory.anonymous([(0, 1 << 20)], mergeable=False).regions[0].buffer)
    finally:
        plain.close()
        merged.close()
