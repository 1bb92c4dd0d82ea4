"""ConfigSpace against PCI Local Bus 3.0 chapter 6: header defaults, write masks, BAR sizing, capabilities."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.pci import config as c
from asyncvmm.pci.config import ConfigSpace


def _space(**kw) -> ConfigSpace:
    args = dict(vendor_id=0x1AF4, device_id=0x1042, class_code=0x018000, revision_id=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x0040)
    args.update(kw)
    return ConfigSpace(**args)


def r8(s, off):
    return s.read(off, 1)[0]


def r16(s, off):
    return struct.unpack("<H", s.read(off, 2))[0]


def r32(s, off):
    return struct.unpack("<I", s.read(off, 4))[0]


def w16(s, off, v):
    s.write(off, struct.pack("<H", v))


def w32(s, off, v):
    s.write(off, struct.pack("<I", v))


# -- the type-0 header (§6.1, §6.2) -------------------------------------------------------------

def test_header_identity_fields():
    s = _space(header_type=0, interrupt_pin=1)
    assert r16(s, c.PCI_VENDOR_ID) == 0x1AF4
    assert r16(s, c.PCI_DEVICE_ID) == 0x1042
    assert r32(s, c.PCI_CLASS_REVISION) == 0x0180_0001       # class << 8 | revision
    assert r8(s, c.PCI_CLASS_PROG) == 0x00
    assert r16(s, c.PCI_CLASS_DEVICE) == 0x0180               # sub-class 0x80, base class 0x01
    assert r8(s, c.PCI_HEADER_TYPE) == c.PCI_HEADER_TYPE_NORMAL
    assert r16(s, c.PCI_SUBSYSTEM_VENDOR_ID) == 0x1AF4
    assert r16(s, c.PCI_SUBSYSTEM_ID) == 0x0040
    assert r8(s, c.PCI_INTERRUPT_PIN) == 1


def test_reset_defaults():
    s = _space()
    assert s.command == 0 and not s.memory_enabled and not s.bus_master_enabled
    assert s.status == 0                          # no capabilities yet: CAP_LIST clear
    assert r8(s, c.PCI_CAPABILITY_LIST) == 0
    for off in range(c.PCI_BASE_ADDRESS_0, c.PCI_CARDBUS_CIS, 4):
        assert r32(s, off) == 0                   # unimplemented BARs read 0
    assert r32(s, c.PCI_ROM_ADDRESS) == 0
    assert s.read(c.PCI_STD_HEADER_SIZEOF, c.PCI_CFG_SPACE_EXP_SIZE - 64) == bytes(4096 - 64)


@pytest.mark.parametrize("off,size", [
    (c.PCI_VENDOR_ID, 2), (c.PCI_DEVICE_ID, 2), (c.PCI_STATUS, 2), (c.PCI_REVISION_ID, 1),
    (c.PCI_CLASS_PROG, 1), (c.PCI_CLASS_DEVICE, 2), (c.PCI_HEADER_TYPE, 1), (c.PCI_BIST, 1),
    (c.PCI_LATENCY_TIMER, 1), (c.PCI_CARDBUS_CIS, 4), (c.PCI_SUBSYSTEM_VENDOR_ID, 2),
    (c.PCI_SUBSYSTEM_ID, 2), (c.PCI_ROM_ADDRESS, 4), (c.PCI_CAPABILITY_LIST, 1),
    (c.PCI_INTERRUPT_PIN, 1), (c.PCI_MIN_GNT, 1), (c.PCI_MAX_LAT, 1),
])
def test_read_only_registers_ignore_writes(off, size):
    s = _space(interrupt_pin=1)
    before = s.read(off, size)
    s.write(off, b"\xff" * size)
    assert s.read(off, size) == before
    s.write(off, b"\x00" * size)
    assert s.read(off, size) == before


def test_status_is_read_only_including_cap_list():
    s = _space()
    s.add_capability(c.PCI_CAP_ID_VNDR, b"\x04\x00")
    w16(s, c.PCI_STATUS, 0xFFFF)          # write-1-to-clear bits are not implemented: nothing changes
    assert s.status == c.PCI_STATUS_CAP_LIST
    w16(s, c.PCI_STATUS, 0)
    assert s.status == c.PCI_STATUS_CAP_LIST


def test_command_writable_bits():
    s = _space()
    w16(s, c.PCI_COMMAND, 0xFFFF)
    assert s.command == (c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER | c.PCI_COMMAND_PARITY
                         | c.PCI_COMMAND_SERR | c.PCI_COMMAND_INTX_DISABLE)
    assert not s.command & c.PCI_COMMAND_IO          # no I/O BARs: hardwired 0
    assert s.memory_enabled and s.bus_master_enabled
    w16(s, c.PCI_COMMAND, c.PCI_COMMAND_MASTER)
    assert s.command == c.PCI_COMMAND_MASTER and not s.memory_enabled


def test_command_byte_write_leaves_other_byte():
    s = _space()
    w16(s, c.PCI_COMMAND, c.PCI_COMMAND_INTX_DISABLE | c.PCI_COMMAND_MEMORY)
    s.write(c.PCI_COMMAND, b"\x04")                  # low byte only: MASTER, MEMORY off
    assert s.command == c.PCI_COMMAND_INTX_DISABLE | c.PCI_COMMAND_MASTER


def test_scratch_registers_are_writable():
    s = _space()
    s.write(c.PCI_INTERRUPT_LINE, b"\x0b")
    s.write(c.PCI_CACHE_LINE_SIZE, b"\x10")
    assert r8(s, c.PCI_INTERRUPT_LINE) == 0x0B and r8(s, c.PCI_CACHE_LINE_SIZE) == 0x10


def test_dword_write_over_header_applies_masks_per_byte():
    s = _space()
    w32(s, c.PCI_COMMAND, 0xFFFF_FFFF)               # COMMAND and STATUS in one access
    assert s.command == 0x0546 and s.status == 0
    w32(s, c.PCI_VENDOR_ID, 0)
    assert r32(s, c.PCI_VENDOR_ID) == 0x1042_1AF4


@pytest.mark.parametrize("kw", [dict(vendor_id=0x10000), dict(class_code=1 << 24), dict(interrupt_pin=5),
                                dict(revision_id=-1)])
def test_constructor_refuses_out_of_range_fields(kw):
    with pytest.raises(ValueError):
        _space(**kw)


# -- out-of-range accesses --------------------------------------------------------------------

def test_beyond_the_space_reads_all_ones_and_drops_writes():
    s = _space()
    assert s.read(4096, 4) == b"\xff" * 4
    assert s.read(4094, 4) == b"\x00\x00\xff\xff"
    assert s.read(-1, 2) == b"\xff\xff"
    before = s.state()
    s.write(4095, b"\xff\xff")
    s.write(-4, b"\xff\xff")
    assert s.state() == before


@given(off=st.integers(-8, 4200), data=st.binary(min_size=0, max_size=8))
def test_guest_writes_touch_only_writable_bits(off, data):
    s = _space()
    s.add_bar(0, 0x8000)
    s.add_capability(c.PCI_CAP_ID_VNDR, b"\x08\x01\xaa\xbb\xcc\xdd", writable=b"\x00\x00\xff\x0f\x00\x00")
    masks = s._wmask
    before = s.state()
    s.write(off, data)
    after = s.state()
    for i, (a, b) in enumerate(zip(before, after)):
        assert (a ^ b) & ~masks[i] & 0xFF == 0
    assert len(s.read(off, len(data))) == len(data)


# -- BARs (§6.2.5.1) ----------------------------------------------------------------------------

def test_bar64_type_bits_and_sizing():
    s = _space()
    s.add_bar(0, 0x8000)                              # 64-bit, non-prefetchable
    assert r32(s, c.PCI_BASE_ADDRESS_0) == c.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert r32(s, c.PCI_BASE_ADDRESS_1) == 0
    # Linux's __pci_read_base: save, write all ones, read the size back, restore.
    w32(s, c.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF)
    w32(s, c.PCI_BASE_ADDRESS_1, 0xFFFF_FFFF)
    lo, hi = r32(s, c.PCI_BASE_ADDRESS_0), r32(s, c.PCI_BASE_ADDRESS_1)
    assert lo == 0xFFFF_8000 | c.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert hi == 0xFFFF_FFFF
    size = (~((hi << 32) | (lo & ~0xF)) & (2**64 - 1)) + 1
    assert size == 0x8000 == s.bar_size(0)
    w32(s, c.PCI_BASE_ADDRESS_0, 0)
    w32(s, c.PCI_BASE_ADDRESS_1, 0)
    assert s.bar_address(0) == 0


def test_bar64_guest_programs_address():
    s = _space()
    s.add_bar(2, 0x4000, prefetchable=True)
    w32(s, c.PCI_BASE_ADDRESS_2, 0x1234_5678)        # low bits below the size are read-only
    w32(s, c.PCI_BASE_ADDRESS_3, 0x40)
    assert r32(s, c.PCI_BASE_ADDRESS_2) == 0x1234_4000 | 0x0C
    assert s.bar_address(2) == 0x40_1234_4000


def test_bar32_sizing():
    s = _space()
    s.add_bar(1, 0x1000, mem64=False)
    assert r32(s, c.PCI_BASE_ADDRESS_1) == 0
    w32(s, c.PCI_BASE_ADDRESS_1, 0xFFFF_FFFF)
    assert r32(s, c.PCI_BASE_ADDRESS_1) == 0xFFFF_F000
    assert r32(s, c.PCI_BASE_ADDRESS_2) == 0            # the next BAR is unimplemented
    w32(s, c.PCI_BASE_ADDRESS_2, 0xFFFF_FFFF)
    assert r32(s, c.PCI_BASE_ADDRESS_2) == 0


def test_bar64_larger_than_4g_masks_high_half():
    s = _space()
    s.add_bar(0, 1 << 34)
    w32(s, c.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF)
    w32(s, c.PCI_BASE_ADDRESS_1, 0xFFFF_FFFF)
    assert r32(s, c.PCI_BASE_ADDRESS_0) == c.PCI_BASE_ADDRESS_MEM_TYPE_64
    assert r32(s, c.PCI_BASE_ADDRESS_1) == 0xFFFF_FFFC


@given(shift=st.integers(4, 40), mem64=st.booleans(), prefetch=st.booleans())
def test_bar_sizing_reads_back_the_size(shift, mem64, prefetch):
    size = 1 << shift
    s = _space()
    if not mem64 and size > 1 << 31:
        with pytest.raises(ValueError):
            s.add_bar(0, size, mem64=False)
        return
    s.add_bar(0, size, mem64=mem64, prefetchable=prefetch)
    w32(s, c.PCI_BASE_ADDRESS_0, 0xFFFF_FFFF)
    if mem64:
        w32(s, c.PCI_BASE_ADDRESS_1, 0xFFFF_FFFF)
        raw = r32(s, c.PCI_BASE_ADDRESS_0) | r32(s, c.PCI_BASE_ADDRESS_1) << 32
        width = 64
    else:
        raw = r32(s, c.PCI_BASE_ADDRESS_0)
        width = 32
    type_bits = raw & 0xF
    assert type_bits == (4 if mem64 else 0) | (8 if prefetch else 0)
    assert (~(raw & ~0xF) & (2**width - 1)) + 1 == size


def test_set_bar_address_keeps_type_bits():
    s = _space()
    s.add_bar(0, 0x8000, prefetchable=True)
    s.set_bar_address(0, 0x40_0000_8000)
    assert s.bar_address(0) == 0x40_0000_8000
    assert r32(s, c.PCI_BASE_ADDRESS_0) == 0x8000 | 0x0C
    assert r32(s, c.PCI_BASE_ADDRESS_1) == 0x40
    with pytest.raises(ValueError):
        s.set_bar_address(0, 0x4000)                   # not aligned to the size
    s32 = _space()
    s32.add_bar(0, 0x1000, mem64=False)
    with pytest.raises(ValueError):
        s32.set_bar_address(0, 1 << 32)                # beyond a 32-bit BAR


@pytest.mark.parametrize("args,kw", [
    ((5, 0x1000), {}),                          # 64-bit BAR needs index 5 and 6
    ((6, 0x1000), dict(mem64=False)),
    ((-1, 0x1000), dict(mem64=False)),
    ((0, 0x1800), {}),                          # not a power of two
    ((0, 8), {}),                               # below 16 bytes
    ((0, 1 << 32), dict(mem64=False)),
])
def test_add_bar_refuses(args, kw):
    with pytest.raises(ValueError):
        _space().add_bar(*args, **kw)


def test_add_bar_refuses_overlap():
    s = _space()
    s.add_bar(0, 0x1000)
    for i in (0, 1):
        with pytest.raises(ValueError):
            s.add_bar(i, 0x1000, mem64=False)
    s.add_bar(2, 0x1000, mem64=False)
    with pytest.raises(ValueError):
        s.add_bar(1, 0x1000)                       # its high half would be BAR 2


def test_bar_accessors_refuse_missing_bars():
    s = _space()
    s.add_bar(0, 0x1000)
    for f in (s.bar_address, s.bar_size):
        with pytest.raises(ValueError):
            f(1)                                   # the high half of BAR 0 is not a BAR
        with pytest.raises(ValueError):
            f(3)


# -- capabilities (§6.7) -----------------------------------------------------------------------

def _walk(s):
    """The capability list as Linux's __pci_find_next_cap_ttl reads it."""
    out = []
    pos = r8(s, c.PCI_CAPABILITY_LIST) & ~3
    while pos:
        assert pos >= 0x40 and pos % 4 == 0
        out.append((pos, r8(s, pos)))
        pos = r8(s, pos + c.PCI_CAP_LIST_NEXT) & ~3
        assert len(out) < 48
    return out


def test_capability_chain():
    s = _space()
    a = s.add_capability(c.PCI_CAP_ID_VNDR, b"\x10" + bytes(13))          # 16 bytes in all
    b = s.add_capability(c.PCI_CAP_ID_VNDR, b"\x05\x02\x03")              # 5 bytes -> next dword
    d = s.add_capability(c.PCI_CAP_ID_MSIX, bytes(10))
    assert (a, b, d) == (0x40, 0x50, 0x58)
    assert s.status & c.PCI_STATUS_CAP_LIST
    assert r8(s, c.PCI_CAPABILITY_LIST) == 0x40
    assert _walk(s) == [(0x40, c.PCI_CAP_ID_VNDR), (0x50, c.PCI_CAP_ID_VNDR), (0x58, c.PCI_CAP_ID_MSIX)]
    assert r8(s, d + 1) == 0                                                # terminator
    assert s.read(b + 2, 3) == b"\x05\x02\x03"


def test_capability_body_write_masks():
    s = _space()
    off = s.add_capability(c.PCI_CAP_ID_MSIX, b"\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                           writable=b"\x00\xc0" + bytes(8))                 # MSI-X Message Control bits 15:14
    w16(s, off + 2, 0xFFFF)
    assert r16(s, off + 2) == 0xC003
    s.write(off, b"\xff\xff")                                               # id and next are read-only
    assert s.read(off, 2) == bytes([c.PCI_CAP_ID_MSIX, 0])
    w32(s, off + 4, 0xFFFF_FFFF)
    assert r32(s, off + 4) == 0


def test_capability_refuses_bad_masks_and_overflow():
    s = _space()
    with pytest.raises(ValueError):
        s.add_capability(c.PCI_CAP_ID_VNDR, b"\x00\x00", writable=b"\x00")
    with pytest.raises(ValueError):
        s.add_capability(0x100, b"")
    s.add_capability(c.PCI_CAP_ID_VNDR, bytes(0xB0 - 2))    # 0x40..0xF0
    with pytest.raises(ValueError):
        s.add_capability(c.PCI_CAP_ID_VNDR, bytes(15))      # 0xF0 + 17 > 0x100
    assert s.add_capability(c.PCI_CAP_ID_VNDR, bytes(14)) == 0xF0
    assert _walk(s) == [(0x40, 9), (0xF0, 9)]


@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=8))
def test_capability_list_is_well_formed(lengths):
    s = _space()
    offsets = []
    for i, n in enumerate(lengths):
        try:
            offsets.append(s.add_capability(0x09, bytes([i]) * n))
        except ValueError:
            break
    walked = _walk(s)
    assert [p for p, _ in walked] == offsets
    for (p, _), n in zip(walked, lengths):
        assert p + 2 + n <= 0x100
    for (p, _), (q, _) in zip(walked, walked[1:]):
        assert q >= p + 2 + lengths[offsets.index(p)]


# -- snapshots ----------------------------------------------------------------------------------

def test_state_restore_round_trip():
    s = _space()
    s.add_bar(0, 0x8000)
    off = s.add_capability(c.PCI_CAP_ID_MSIX, bytes(10), writable=b"\x00\xc0" + bytes(8))
    w16(s, c.PCI_COMMAND, c.PCI_COMMAND_MEMORY | c.PCI_COMMAND_MASTER)
    w32(s, c.PCI_BASE_ADDRESS_0, 0xC100_0000)
    s.write(off + 3, b"\x80")
    raw = s.state()
    t = _space()
    t.add_bar(0, 0x8000)
    t.add_capability(c.PCI_CAP_ID_MSIX, bytes(10), writable=b"\x00\xc0" + bytes(8))
    t.restore(raw)
    assert t.state() == raw
    assert t.bar_address(0) == 0xC100_0000 and t.memory_enabled


def test_restore_refuses_wrong_length_and_read_only_differences():
    s = _space()
    s.add_bar(0, 0x8000)
    with pytest.raises(ValueError):
        s.restore(s.state()[:256])
    raw = bytearray(s.state())
    raw[c.PCI_DEVICE_ID] ^= 1
    with pytest.raises(ValueError, match="read-only"):
        s.restore(bytes(raw))
    raw = bytearray(s.state())
    raw[c.PCI_BASE_ADDRESS_0] = 0x00                   # a 32-bit BAR where this one is 64-bit
    with pytest.raises(ValueError):
        s.restore(bytes(raw))
    other = _space()
    with pytest.raises(ValueError):                    # no BAR 0 there
        s.restore(other.state())
