"""Bus 0, ECAM and configuration mechanism #1, driven the way Linux's pci/direct.c and mmconfig do."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.guestfault import GuestFaults
from asyncvmm.pci import config as c
from asyncvmm.pci.bus import PciBus, PciBusFullError, PciConfigIo, PciConfigMmio
from asyncvmm.pci.config import ConfigSpace
from asyncvmm.pci.hostbridge import HostBridge


class _Function:
    def __init__(self, device_id: int = 0x1042) -> None:
        self.config = ConfigSpace(vendor_id=0x1AF4, device_id=device_id, class_code=0x018000)
        self.config.add_bar(0, 0x8000)
        self.writes: list[tuple[int, bytes]] = []

    def config_read(self, offset, size):
        return self.config.read(offset, size)

    def config_write(self, offset, data):
        self.writes.append((offset, data))
        self.config.write(offset, data)


@pytest.fixture
def faults():
    return GuestFaults(logger=logging.getLogger("test.pci"))


@pytest.fixture
def rig(faults):
    bus = PciBus(faults)
    bus.add(HostBridge(), slot=0)
    dev = _Function()
    assert bus.add(dev) == 1
    return bus, dev


def ecam(bus=0, dev=0, fn=0, reg=0):
    return bus << 20 | dev << 15 | fn << 12 | reg


def cf8(bus=0, dev=0, fn=0, reg=0, enable=True):
    return (enable << 31) | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC) | (reg >> 8) << 24


# -- PciBus -------------------------------------------------------------------------------------

def test_add_picks_first_free_slot_from_1():
    bus = PciBus()
    fns = [_Function() for _ in range(31)]
    assert [bus.add(f) for f in fns] == list(range(1, 32))
    assert bus.function(0) is None                      # slot 0 is left for the host bridge
    with pytest.raises(PciBusFullError, match=r"^Could not find an available device slot on the PCI bus\.$"):
        bus.add(_Function())
    assert bus.remove(7) is fns[6]
    assert bus.function(7) is None
    assert bus.add(_Function()) == 7


def test_add_explicit_slot():
    bus = PciBus()
    hb = HostBridge()
    assert bus.add(hb, slot=0) == 0 and bus.function(0) is hb
    with pytest.raises(ValueError):
        bus.add(_Function(), slot=0)
    for bad in (-1, 32):
        with pytest.raises(ValueError):
            bus.add(_Function(), slot=bad)
    assert bus.add(_Function(), slot=5) == 5
    assert bus.add(_Function()) == 1


def test_remove_empty_slot_refused():
    bus = PciBus()
    with pytest.raises(ValueError):
        bus.remove(3)
    with pytest.raises(ValueError):
        bus.remove(40)
    assert bus.function(40) is None


def test_absent_functions_read_all_ones(rig, faults):
    bus, dev = rig
    assert bus.config_read(0, 2, 0, 0, 4) == b"\xff" * 4      # empty slot
    assert bus.config_read(0, 1, 1, 0, 4) == b"\xff" * 4      # function 1 of a present device
    assert bus.config_read(1, 1, 0, 0, 2) == b"\xff" * 2      # bus 1
    bus.config_write(0, 1, 3, c.PCI_COMMAND, b"\x02\x00")
    bus.config_write(2, 1, 0, c.PCI_COMMAND, b"\x02\x00")
    assert dev.writes == [] and dev.config.command == 0
    assert faults.metrics.pci_config == 0                          # enumeration is not a fault


def test_present_function_answers(rig):
    bus, dev = rig
    assert bus.config_read(0, 1, 0, 0, 4) == struct.pack("<HH", 0x1AF4, 0x1042)
    bus.config_write(0, 1, 0, c.PCI_COMMAND, b"\x06\x00")
    assert dev.config.command == 6


@pytest.mark.parametrize("offset,size", [(1, 2), (2, 4), (1, 4), (0, 3), (0, 8), (0, 0), (4094, 4),
                                         (4096, 1), (-4, 4)])
def test_bad_accesses_are_guest_faults(rig, faults, offset, size):
    bus, dev = rig
    assert bus.config_read(0, 1, 0, offset, size) == b"\xff" * max(size, 0)
    bus.config_write(0, 1, 0, offset, b"\xff" * max(size, 0))
    assert dev.writes == []
    assert faults.metrics.pci_config == 2


def test_short_answer_is_padded(faults):
    class Short:
        def config_read(self, offset, size):
            return b"\x01"

        def config_write(self, offset, data):
            pass

    bus = PciBus(faults)
    bus.add(Short(), slot=3)
    assert bus.config_read(0, 3, 0, 0, 4) == b"\x01\xff\xff\xff"


# -- ECAM ---------------------------------------------------------------------------------------

def test_ecam_decoding(rig):
    bus, dev = rig
    m = PciConfigMmio(bus)
    assert m.read(ecam(dev=0), 4) == struct.pack("<HH", 0x8086, 0x0D57)
    assert m.read(ecam(dev=1), 2) == struct.pack("<H", 0x1AF4)
    assert m.read(ecam(dev=1, reg=2), 2) == struct.pack("<H", 0x1042)
    assert m.read(ecam(dev=1, reg=0xB), 1) == b"\x01"          # base class
    m.write(ecam(dev=1, reg=c.PCI_BASE_ADDRESS_0), b"\xff\xff\xff\xff")
    assert dev.writes == [(c.PCI_BASE_ADDRESS_0, b"\xff\xff\xff\xff")]
    assert m.read(ecam(dev=1, reg=c.PCI_BASE_ADDRESS_0), 4) == struct.pack("<I", 0xFFFF_8004)
    assert m.read(ecam(dev=1, reg=0x100), 4) == bytes(4)         # no extended capabilities
    assert m.read(ecam(dev=1, fn=1), 4) == b"\xff" * 4
    assert m.read(ecam(dev=31), 4) == b"\xff" * 4
    assert m.read(ecam(bus=1, dev=1), 4) == b"\xff" * 4
    assert m.read(ecam(bus=255, dev=31, fn=7, reg=0xFFC), 4) == b"\xff" * 4


def test_ecam_unaligned(rig, faults):
    bus, dev = rig
    m = PciConfigMmio(bus)
    assert m.read(ecam(dev=1, reg=1), 2) == b"\xff\xff"
    assert m.read(ecam(dev=1, reg=0xFFE), 4) == b"\xff" * 4
    m.write(ecam(dev=1, reg=5), b"\x02\x00")
    assert dev.writes == [] and faults.metrics.pci_config == 3


@given(dev=st.integers(0, 31), fn=st.integers(0, 7), reg=st.integers(0, 0xFFF), size=st.sampled_from([1, 2, 4]))
def test_ecam_agrees_with_bus(dev, fn, reg, size):
    bus = PciBus(GuestFaults(logger=logging.getLogger("test.pci")))
    bus.add(HostBridge(), slot=0)
    bus.add(_Function(), slot=9)
    reg -= reg % size
    assert PciConfigMmio(bus).read(ecam(0, dev, fn, reg), size) == bus.config_read(0, dev, fn, reg, size)


# -- configuration mechanism #1 -----------------------------------------------------------------

def _io(rig):
    bus, dev = rig
    return PciConfigIo(bus), dev


def _outl(io, port, v):
    io.write(port - 0xCF8, struct.pack("<I", v))


def _inl(io, port):
    return struct.unpack("<I", io.read(port - 0xCF8, 4))[0]


def test_config_address_latch(rig):
    io, _ = _io(rig)
    # Linux's pci_check_type1: a byte to 0xCFB, then 0x80000000 must read back.
    io.write(3, b"\x01")
    _outl(io, 0xCF8, 0x8000_0000)
    assert _inl(io, 0xCF8) == 0x8000_0000
    _outl(io, 0xCF8, 0xFFFF_FFFF)
    assert _inl(io, 0xCF8) == 0x8FFF_FFFC                        # reserved 30:28 and 1:0 read 0
    assert io.read(0, 2) == b"\xff\xff" and io.read(3, 1) == b"\xff"
    io.write(0, b"\x00\x00")                                     # word writes do not latch
    assert _inl(io, 0xCF8) == 0x8FFF_FFFC


def test_config_data_dword(rig):
    io, dev = _io(rig)
    _outl(io, 0xCF8, cf8(dev=0))
    assert _inl(io, 0xCFC) == 0x0D57_8086
    _outl(io, 0xCF8, cf8(dev=1, reg=c.PCI_CLASS_REVISION))
    assert _inl(io, 0xCFC) == 0x0180_0000
    _outl(io, 0xCF8, cf8(dev=1, reg=c.PCI_BASE_ADDRESS_0))
    _outl(io, 0xCFC, 0xFFFF_FFFF)
    assert _inl(io, 0xCFC) == 0xFFFF_8004


def test_config_data_bytes_and_words(rig):
    io, dev = _io(rig)
    _outl(io, 0xCF8, cf8(dev=1, reg=0))
    assert io.read(4, 1) == b"\xf4" and io.read(5, 1) == b"\x1a"    # 0xCFC, 0xCFD
    assert io.read(6, 1) == b"\x42" and io.read(7, 1) == b"\x10"    # 0xCFE, 0xCFF
    assert io.read(6, 2) == struct.pack("<H", 0x1042)              # word at 0xCFE
    _outl(io, 0xCF8, cf8(dev=1, reg=c.PCI_COMMAND))
    io.write(4, b"\x06\x00")                                       # COMMAND, as pci_write_config_word
    assert dev.config.command == 6
    assert io.read(6, 2) == bytes(2)                               # STATUS, through 0xCFE
    io.write(5, b"\x04")                                           # byte at 0xCFD: COMMAND high byte
    assert dev.config.command == 0x406
    _outl(io, 0xCF8, cf8(dev=1, reg=c.PCI_INTERRUPT_LINE))
    io.write(4, b"\x0b")
    assert dev.config.read(c.PCI_INTERRUPT_LINE, 1) == b"\x0b"


def test_config_data_misaligned_is_a_fault(rig, faults):
    io, dev = _io(rig)
    _outl(io, 0xCF8, cf8(dev=1))
    assert io.read(5, 2) == b"\xff\xff"                            # word at 0xCFD
    io.write(7, b"\x00\x00")                                       # word at 0xCFF
    assert dev.writes == [] and faults.metrics.pci_config == 2


def test_enable_bit_clear(rig):
    io, dev = _io(rig)
    _outl(io, 0xCF8, cf8(dev=1, reg=c.PCI_COMMAND, enable=False))
    assert _inl(io, 0xCFC) == 0xFFFF_FFFF
    io.write(4, b"\x06\x00")
    assert dev.writes == []


def test_absent_through_ports(rig):
    io, _ = _io(rig)
    for addr in (cf8(dev=2), cf8(dev=1, fn=1), cf8(bus=1, dev=1)):
        _outl(io, 0xCF8, addr)
        assert _inl(io, 0xCFC) == 0xFFFF_FFFF


def test_amd_extended_register_bits(rig):
    io, dev = _io(rig)
    dev.config.add_capability(c.PCI_CAP_ID_VNDR, b"\x04\x00")
    _outl(io, 0xCF8, cf8(dev=1, reg=0x100))
    assert _inl(io, 0xCF8) == 0x8100_0800                        # register 11:8 in bits 27:24
    assert _inl(io, 0xCFC) == 0                                  # the extended space, not register 0
    # the same config space read straight at 0x100 agrees
    _outl(io, 0xCF8, cf8(dev=1, reg=0x40))
    assert _inl(io, 0xCFC) == 0x0004_0009


@given(dev=st.integers(0, 31), fn=st.integers(0, 7), reg=st.integers(0, 0xFFF), size=st.sampled_from([1, 2, 4]))
def test_ports_agree_with_ecam(dev, fn, reg, size):
    bus = PciBus(GuestFaults(logger=logging.getLogger("test.pci")))
    bus.add(HostBridge(), slot=0)
    bus.add(_Function(), slot=4)
    reg -= reg % size
    io = PciConfigIo(bus)
    _outl(io, 0xCF8, cf8(0, dev, fn, reg & ~3))
    assert io.read(4 + reg % 4, size) == PciConfigMmio(bus).read(ecam(0, dev, fn, reg), size)


# -- the host bridge ------------------------------------------------------------------------------

def test_host_bridge_identity():
    hb = HostBridge()
    assert hb.config_read(0, 4) == struct.pack("<HH", 0x8086, 0x0D57)
    assert hb.config_read(c.PCI_CLASS_REVISION, 4) == struct.pack("<I", 0x0600_0000)
    assert hb.config_read(c.PCI_HEADER_TYPE, 1) == b"\x00"
    assert hb.config_read(c.PCI_STATUS, 2) == bytes(2)
    for off in range(c.PCI_BASE_ADDRESS_0, c.PCI_CARDBUS_CIS, 4):
        hb.config_write(off, b"\xff" * 4)
        assert hb.config_read(off, 4) == bytes(4)
    hb.config_write(c.PCI_VENDOR_ID, b"\x00\x00")
    assert hb.config_read(c.PCI_VENDOR_ID, 2) == struct.pack("<H", 0x8086)
