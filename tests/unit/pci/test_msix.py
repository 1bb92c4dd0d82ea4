"""Msix alone: the capability body, table and PBA accesses, masking and pending bits, snapshots."""

from __future__ import annotations

import struct

import msgspec
import pytest

from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults
from asyncvmm.pci.msix import (
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    Msix,
    MsixState,
)


class Rig:
    def __init__(self, n: int = 3) -> None:
        self.sent: list[int] = []
        self.routes: list[int] = []
        self.faults = GuestFaults(GuestFaultMetrics())
        self.msix = Msix(n, deliver=self.sent.append, on_route_change=self.routes.append,
                         faults=self.faults)

    def program(self, v: int, address: int, data: int, masked: bool = False) -> None:
        self.msix.write_table(16 * v, struct.pack("<Q", address))
        self.msix.write_table(16 * v + 8, struct.pack("<II", data, int(masked)))

    def enable(self, function_mask: bool = False) -> None:
        self.msix.control_written(PCI_MSIX_FLAGS_ENABLE | (PCI_MSIX_FLAGS_MASKALL if function_mask else 0))


def u32(b: bytes) -> int:
    return struct.unpack("<I", b)[0]


def test_capability_body_and_write_mask() -> None:
    body, writable = Rig(5).msix.capability(table_bar=0, table_offset=0x4000, pba_bar=2, pba_offset=0x6000)
    control, table, pba = struct.unpack("<HII", body)
    assert control == 4                               # N-1, enable and mask clear
    assert (table, pba) == (0x4000, 0x6002)           # offset | BIR
    assert writable == bytes([0x00, 0xC0]) + bytes(8)  # only bits 15:14 of Message Control
    with pytest.raises(ValueError):
        Rig().msix.capability(table_bar=0, table_offset=0x4004, pba_bar=0, pba_offset=0)
    with pytest.raises(ValueError):
        Rig().msix.capability(table_bar=6, table_offset=0, pba_bar=0, pba_offset=0)


def test_every_vector_starts_masked_and_table_reads_back() -> None:
    r = Rig()
    assert all(r.msix.masked(v) for v in range(3))
    assert u32(r.msix.read_table(0xC, 4)) == 1
    r.program(1, 0xFEE0_1000_0000_0000 | 0x1234, 0x4041)
    assert r.msix.message(1) == (0xFEE0_1000_0000_1234, 0x4041)
    assert r.msix.read_table(16, 8) == struct.pack("<Q", 0xFEE0_1000_0000_1234)
    assert r.msix.read_table(24, 8) == struct.pack("<II", 0x4041, 0)
    assert not r.msix.masked(1) and r.msix.masked(0)
    assert set(r.routes) == {1}


def test_reserved_vector_control_bits_read_zero() -> None:
    r = Rig()
    r.msix.write_table(0xC, struct.pack("<I", 0xFFFF_FFFE))
    assert u32(r.msix.read_table(0xC, 4)) == 0


def test_trigger_delivers_only_when_enabled_and_unmasked() -> None:
    r = Rig()
    r.program(0, 0xFEE0_0000, 0x30)
    r.msix.trigger(0)                      # MSI-X not enabled yet: pending
    assert r.sent == [] and r.msix.pending(0)
    r.enable()                             # enabling sends what is pending and unmasked
    assert r.sent == [0] and not r.msix.pending(0)
    r.msix.trigger(0)
    assert r.sent == [0, 0]


def test_masked_vector_becomes_pending_and_fires_on_unmask() -> None:
    r = Rig()
    r.enable()
    r.program(2, 0xFEE0_0000, 0x31, masked=True)
    r.msix.trigger(2)
    r.msix.trigger(2)                      # still one pending bit
    assert r.sent == []
    assert r.msix.read_pba(0, 8) == struct.pack("<Q", 1 << 2)
    r.msix.write_table(16 * 2 + 12, struct.pack("<I", 0))
    assert r.sent == [2]
    assert r.msix.read_pba(0, 4) == bytes(4)


def test_function_mask_holds_every_vector() -> None:
    r = Rig()
    r.program(0, 0xFEE0_0000, 0x30)
    r.program(1, 0xFEE0_0000, 0x31)
    r.enable(function_mask=True)
    assert r.msix.masked(0) and r.msix.masked(1)
    r.msix.trigger(1)
    r.msix.trigger(0)
    assert r.sent == []
    r.routes.clear()
    r.enable()
    assert sorted(r.sent) == [0, 1]
    assert sorted(r.routes) == [0, 1, 2]   # every vector's effective mask changed


def test_unmasking_one_vector_under_function_mask_sends_nothing() -> None:
    r = Rig()
    r.enable(function_mask=True)
    r.program(0, 0xFEE0_0000, 0x30, masked=True)
    r.msix.trigger(0)
    r.msix.write_table(12, struct.pack("<I", 0))
    assert r.sent == [] and r.msix.pending(0)


def test_rewriting_the_same_entry_is_no_route_change() -> None:
    r = Rig()
    r.program(0, 0xFEE0_0000, 0x30)
    r.routes.clear()
    r.program(0, 0xFEE0_0000, 0x30)
    assert r.routes == []


@pytest.mark.parametrize("offset,size", [(0, 1), (0, 2), (2, 4), (4, 8), (0, 16), (1, 8)])
def test_odd_table_accesses_are_ignored_and_reported(offset: int, size: int) -> None:
    r = Rig()
    assert r.msix.read_table(offset, size) == bytes(size)
    r.msix.write_table(offset, b"\xff" * size)
    assert r.msix.message(0) == (0, 0) and r.msix.masked(0)
    assert r.faults.metrics.pci_msix == 2


@pytest.mark.parametrize("offset", [48, 0x1000, -4, 1 << 40])
def test_table_access_out_of_range_is_ignored_and_reported(offset: int) -> None:
    r = Rig(3)
    assert r.msix.read_table(offset, 4) == bytes(4)
    r.msix.write_table(offset, b"\xff" * 4)
    assert r.msix.read_table(44, 4) == struct.pack("<I", 1)
    assert r.faults.metrics.pci_msix == 2


def test_pba_is_read_only_and_bounded() -> None:
    r = Rig(70)                            # two QWORDs of pending bits
    r.msix.trigger(65)
    assert r.msix.pba_size == 16
    assert r.msix.read_pba(8, 8) == struct.pack("<Q", 2)
    assert r.msix.read_pba(12, 4) == bytes(4)
    r.msix.write_pba(8, bytes(8))
    assert r.msix.pending(65)
    assert r.msix.read_pba(16, 4) == bytes(4)
    assert r.msix.read_pba(1, 4) == bytes(4)
    assert r.faults.metrics.pci_msix == 3


def test_trigger_beyond_the_table_is_a_vmm_bug() -> None:
    with pytest.raises(IndexError):
        Rig(2).msix.trigger(2)


def test_vector_count_limits() -> None:
    with pytest.raises(ValueError):
        Msix(0, deliver=print, on_route_change=print)
    with pytest.raises(ValueError):
        Msix(2049, deliver=print, on_route_change=print)


def test_snapshot_round_trip() -> None:
    r = Rig()
    r.enable()
    r.program(0, 0xFEE0_0000, 0x30)
    r.program(1, 0xFEE0_1000, 0x31, masked=True)
    r.msix.trigger(1)
    raw = msgspec.json.encode(r.msix.state())
    fresh = Rig()
    fresh.msix.restore(msgspec.json.decode(raw, type=MsixState))
    assert fresh.msix.state() == r.msix.state()
    assert sorted(fresh.routes) == [0, 1, 2]
    assert fresh.msix.enabled and fresh.msix.pending(1) and fresh.msix.message(1) == (0xFEE0_1000, 0x31)
    fresh.msix.write_table(16 + 12, struct.pack("<I", 0))
    assert fresh.sent == [1]


@pytest.mark.parametrize("change", [
    {"table": [(0, 0, 1)] * 2},
    {"table": [(1 << 64, 0, 1)] * 3},
    {"table": [(0, 1 << 32, 1)] * 3},
    {"table": [(0, 0, 2)] * 3},
    {"pending": 1 << 3},
    {"pending": -1},
])
def test_restore_refuses_a_state_that_does_not_fit(change: dict) -> None:
    good = Rig().msix.state()
    r = Rig()
    with pytest.raises(ValueError):
        r.msix.restore(msgspec.structs.replace(good, **change))
    assert r.msix.state() == good and r.routes == []
