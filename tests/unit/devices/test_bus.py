"""The address-range bus: dispatch, overlaps, unclaimed accesses as guest faults, inline registers."""

from __future__ import annotations

import pytest

from asyncvmm.devices.bus import Bus, BusError
from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults


class Regs:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset, size):
        return bytes([offset]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


class InlineRegs(Regs):
    def read_inline(self, offset, size):
        return b"\x5a" * size if offset == 0x60 else None

    def write_inline(self, offset, data):
        if offset != 0x64:
            return False
        self.writes.append(("inline", bytes(data)))
        return True


def test_dispatch_by_offset_and_overlaps_refused():
    bus = Bus("mmio", locked=False)
    dev = Regs()
    bus.insert(0x1000, 0x100, dev)
    assert bus.read(0x1010, 2) == b"\x10\x10"
    assert bus.write(0x1020, b"\1") and dev.writes == [(0x20, b"\1")]
    with pytest.raises(BusError):
        bus.insert(0x10F0, 0x20, Regs())
    with pytest.raises(BusError):
        bus.insert(0x0FF0, 0x11, Regs())
    with pytest.raises(BusError):
        bus.insert(0x2000, 0, Regs())


def test_unclaimed_accesses_read_all_ones_and_are_counted():
    metrics = GuestFaultMetrics()
    faults = GuestFaults(metrics)
    mmio, pio = Bus("mmio", faults=faults), Bus("pio", faults=faults)
    mmio.insert(0x1000, 0x100, Regs())
    assert mmio.read(0x10FF, 2) == b"\xff\xff"            # straddles the end: nobody claims it
    assert not mmio.write(0x5000, b"\0\0\0\0")
    assert pio.read(0x2F8, 1) == b"\xff"
    assert (metrics.mmio_unclaimed, metrics.pio_unclaimed) == (2, 1)


def test_a_flood_of_unclaimed_writes_logs_a_bounded_number_of_lines(caplog):
    faults = GuestFaults(GuestFaultMetrics(), burst=3)
    bus = Bus("mmio", faults=faults)
    with caplog.at_level("DEBUG"):
        for _ in range(10_000):
            bus.write(0xDEAD_0000, b"\0")
    assert faults.metrics.mmio_unclaimed == 10_000
    assert len([r for r in caplog.records if "mmio_unclaimed" in r.getMessage()]) <= 4


def test_inline_registers_only_where_the_device_answers_them():
    bus = Bus("mmio", locked=False)
    dev = InlineRegs()
    bus.insert(0x1000, 0x100, dev)
    bus.insert(0x2000, 0x100, Regs())
    assert bus.read_inline(0x1060, 4) == b"\x5a" * 4
    assert bus.read_inline(0x1000, 4) is None             # the device's owner answers
    assert bus.read_inline(0x2060, 4) is None             # no inline registers at all
    assert bus.read_inline(0x9000, 4) is None             # unclaimed: the owner reports it
    assert bus.write_inline(0x1064, b"\1\0\0\0") and dev.writes == [("inline", b"\1\0\0\0")]
    assert not bus.write_inline(0x1070, b"\1\0\0\0")
    assert not bus.write_inline(0x9000, b"\1")


def test_remove_takes_out_exactly_one_device_and_frees_its_range():
    bus = Bus("mmio", locked=False, faults=GuestFaults(GuestFaultMetrics()))
    a, b, c = Regs(), Regs(), Regs()
    bus.insert(0x1000, 0x100, a)
    bus.insert(0x2000, 0x100, b)
    bus.insert(0x3000, 0x100, c)
    assert bus.remove(0x2000) is b
    assert bus.device_at(0x2000) is None and bus.read(0x2004, 1) == b"\xff"
    assert bus.device_at(0x1004) is a and bus.device_at(0x3004) is c
    bus.insert(0x2080, 0x100, b)                   # the range is free again (and may move)
    assert bus.read(0x2084, 1) == b"\x04"


def test_remove_needs_the_exact_base():
    bus = Bus("pio")
    bus.insert(0xCF8, 8, Regs())
    with pytest.raises(BusError, match="no device at 0xcfc"):
        bus.remove(0xCFC)                          # inside the range, not its base
    with pytest.raises(BusError):
        bus.remove(0x3F8)
    bus.remove(0xCF8)
    with pytest.raises(BusError):
        bus.remove(0xCF8)
