"""The MP table, parsed back the way Linux's mpparse reads it (Intel MP spec 1.4, chapter 4)."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.mptable import MpTableError, create_mptable
from asyncvmm.memory import GuestMemory

ENTRY_SIZE = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def scan_for_pointer(mem: GuestMemory, start: int, length: int) -> int | None:
    """Linux's smp_scan_config: a 16-byte-aligned "_MP_" with a valid checksum."""
    for addr in range(start, start + length, 16):
        raw = mem.read(addr, 16)
        if raw[:4] == b"_MP_" and raw[8] == 1 and sum(raw) & 0xFF == 0:
            return addr
    return None


def parse(vcpus: int, extra_gsis=()) -> tuple[bytes, list[bytes]]:
    addr, blob = create_mptable(vcpus=vcpus, extra_gsis=extra_gsis)
    assert addr == layout.EBDA_START and addr + len(blob) <= layout.LOW_RAM_END
    mem = GuestMemory.anonymous([(0, layout.LOW_RAM_END)])
    mem.write(addr, blob)
    # Linux scans the last KiB of base memory (639 KiB) among other places.
    fp_addr = scan_for_pointer(mem, 639 * 1024, 1024)
    assert fp_addr == addr
    fp = mem.read(fp_addr, 16)
    physptr, length, spec, _, feature1 = struct.unpack_from("<IBBBB", fp, 4)
    assert (length, spec, feature1) == (1, 4, 0)                  # 1.4, a table follows
    table_len = struct.unpack("<H", mem.read(physptr + 4, 2))[0]
    table = mem.read(physptr, table_len)
    assert table[:4] == b"PCMP" and table[6] == 4
    assert sum(table) & 0xFF == 0
    count, lapic = struct.unpack_from("<HI", table, 34)
    assert lapic == layout.LAPIC_ADDR
    entries, pos = [], 44
    for _ in range(count):
        size = ENTRY_SIZE[table[pos]]
        entries.append(table[pos:pos + size])
        pos += size
    assert pos == table_len
    types = [e[0] for e in entries]
    assert types == sorted(types)                                 # entries in type order
    return table, entries


@pytest.mark.parametrize("vcpus", [1, 2, 8, 32])
def test_processors_bus_ioapic_and_local_interrupts(vcpus: int) -> None:
    _, entries = parse(vcpus)
    cpus = [struct.unpack("<BBBBII8s", e) for e in entries if e[0] == 0]
    assert [c[1] for c in cpus] == list(range(vcpus))             # APIC ids
    assert [c[3] for c in cpus] == [3] + [1] * (vcpus - 1)        # EN, and BP on cpu 0 only
    assert all(c[2] != 0 for c in cpus)                           # APIC version
    buses = [e for e in entries if e[0] == 1]
    assert buses == [b"\x01\x00ISA   "]
    ioapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapics == [(2, vcpus, 0x11, 1, layout.IOAPIC_ADDR)]
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(t, dst, lint) for _, t, _, _, _, dst, lint in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_isa_irqs_map_one_to_one_onto_ioapic_pins() -> None:
    _, entries = parse(2)
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(irq, pin) for _, _, _, _, irq, _, pin in ints] == [(i, i) for i in range(16)]
    assert all(kind == 0 and flags == 0 and bus == 0 and apic == 2
               for _, kind, flags, bus, _, apic, _ in ints)


def test_virtio_gsis_above_isa_get_edge_high_entries() -> None:
    _, entries = parse(1, extra_gsis=[5, 16, 23, 16])
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert len(ints) == 18                                        # 16 ISA + 16 and 23, once each
    extra = [(irq, flags, pin) for _, _, flags, _, irq, _, pin in ints[16:]]
    assert extra == [(16, 0b0101, 16), (23, 0b0101, 23)]          # active high, edge


@pytest.mark.parametrize("vcpus, gsis", [(0, ()), (255, ()), (1, (24,)), (1, (-1,))])
def test_invalid_input_is_rejected(vcpus, gsis) -> None:
    with pytest.raises(MpTableError):
        create_mptable(vcpus=vcpus, extra_gsis=gsis)


def test_too_many_vcpus_for_the_ebda_is_a_clear_error() -> None:
    create_mptable(vcpus=37, extra_gsis=range(16, 24))           # the most that fits in 1 KiB
    with pytest.raises(MpTableError, match="bytes"):
        create_mptable(vcpus=38, extra_gsis=range(16, 24))


@given(st.integers(1, 37), st.sets(st.integers(5, 23)))
def test_any_fitting_machine_parses(vcpus: int, gsis: set[int]) -> None:
    _, entries = parse(vcpus, sorted(gsis))
    counts = Counter(e[0] for e in entries)
    assert counts == {0: vcpus, 1: 1, 2: 1, 3: 16 + sum(1 for g in gsis if g >= 16), 4: 2}
