"""PCI bus 0 and the two ways a guest reaches its configuration spaces.

Primer.  A configuration access names a function by bus, device (slot) and
function number and a register inside its configuration space.  x86 guests
have two mechanisms for it:

* ECAM, the Enhanced Configuration Access Mechanism (PCIe 4.0 §7.2.2; ACPI's
  MCFG table says where): a memory range in which each function's 4 KiB
  space sits at ``bus << 20 | device << 15 | function << 12``;
* configuration mechanism #1 (PCI 3.0 §3.2.2.3.2): the guest writes a dword
  to CONFIG_ADDRESS (port 0xCF8) naming the register, then reads or writes
  CONFIG_DATA (ports 0xCFC..0xCFF).  Bit 31 enables the translation, bits
  23:16 are the bus, 15:11 the device, 10:8 the function and 7:2 the dword
  register; AMD's extension puts register bits 11:8 in bits 27:24.

This machine has bus 0 only, one function (0) per slot, and the host bridge
in slot 0.  A function that is not there reads as all ones (the master
abort of PCI 3.0 §6.1): that is how a guest enumerates, so it is routine
and not reported.  An access of the wrong size or alignment is a guest
fault: ignored (reads all ones) and reported to :class:`GuestFaults` under
kind ``pci_config``.

Contract.  No I/O: :class:`PciConfigMmio` and :class:`PciConfigIo` are bus
devices (``devices/bus.py``'s ``read(offset, size)`` / ``write(offset,
data)``) whose owner, the loop, calls them; :class:`PciBus` forwards to the
functions' own ``config_read``/``config_write``.  Nothing here locks.
"""

from __future__ import annotations

import logging
from typing import Protocol

from asyncvmm import guestfault
from asyncvmm.pci.config import PCI_CFG_SPACE_EXP_SIZE

PCI_MAX_DEVICES = 32                 # device numbers are 5 bits
PCI_MAX_FUNCTIONS = 8

# ECAM offsets (PCIe 4.0 §7.2.2, table 7-1)
ECAM_BUS_SHIFT = 20
ECAM_DEVICE_SHIFT = 15
ECAM_FUNCTION_SHIFT = 12
ECAM_BUS_SIZE = PCI_MAX_DEVICES * PCI_MAX_FUNCTIONS * PCI_CFG_SPACE_EXP_SIZE    # 1 MiB

# Configuration mechanism #1 (PCI 3.0 §3.2.2.3.2), as offsets into the 8 ports at 0xCF8
CONFIG_ADDRESS = 0
CONFIG_DATA = 4
CONFIG_ADDRESS_ENABLE = 1 << 31
# The bits that read back: enable, AMD's extended register 27:24, bus/device/function/register.
# Bits 30:28 are reserved and bits 1:0 are read-only 0 (§3.2.2.3.2).
_CONFIG_ADDRESS_MASK = 0x8FFF_FFFC

FAULT_KIND = "pci_config"


class PciBusFullError(Exception):
    """Every device slot of bus 0 is taken."""


class PciFunction(Protocol):
    def config_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes (1, 2 or 4, aligned) of the function's configuration space at ``offset``."""

    def config_write(self, offset: int, data: bytes) -> None:
        """A guest write of ``data`` (1, 2 or 4 bytes, aligned) at ``offset``."""


def _valid(offset: int, size: int) -> bool:
    return size in (1, 2, 4) and offset % size == 0 and 0 <= offset <= PCI_CFG_SPACE_EXP_SIZE - size


class PciBus:
    """Bus 0: one function per device slot; slot 0 is the host bridge's."""

    def __init__(self, faults: guestfault.GuestFaults | None = None) -> None:
        self.faults = faults or guestfault.DEFAULT
        self._slots: list[PciFunction | None] = [None] * PCI_MAX_DEVICES

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Put ``function`` in ``slot`` (or the first free slot from 1) and return the slot."""
        if slot is None:
            for slot in range(1, PCI_MAX_DEVICES):
                if self._slots[slot] is None:
                    break
            else:
                raise PciBusFullError("Could not find an available device slot on the PCI bus.")
        elif not 0 <= slot < PCI_MAX_DEVICES:
            raise ValueError(f"PCI slot {slot} is not in 0..{PCI_MAX_DEVICES - 1}")
        elif self._slots[slot] is not None:
            raise ValueError(f"PCI slot {slot} is already in use")
        self._slots[slot] = function
        return slot

    def remove(self, slot: int) -> PciFunction:
        function = self.function(slot)
        if function is None:
            raise ValueError(f"PCI slot {slot} is empty")
        self._slots[slot] = None
        return function

    def function(self, slot: int) -> PciFunction | None:
        return self._slots[slot] if 0 <= slot < PCI_MAX_DEVICES else None

    def _target(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus != 0 or function != 0:
            return None
        return self.function(device)

    def _bad_access(self, what: str, bus: int, device: int, function: int, offset: int,
                    size: int) -> None:
        self.faults.report(FAULT_KIND, "%d-byte configuration %s of %02x:%02x.%x at %#x ignored",
                           size, what, bus, device, function, offset)

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> bytes:
        """The function's answer; all ones for a function that is not there or a bad access."""
        if not _valid(offset, size):
            self._bad_access("read", bus, device, function, offset, size)
            return b"\xff" * max(size, 0)
        target = self._target(bus, device, function)
        if target is None:
            return b"\xff" * size
        data = target.config_read(offset, size)
        return bytes(data[:size]).ljust(size, b"\xff")

    def config_write(self, bus: int, device: int, function: int, offset: int, data: bytes) -> None:
        """Hand the write to the function; dropped if it is not there or the access is bad."""
        if not _valid(offset, len(data)):
            self._bad_access("write", bus, device, function, offset, len(data))
            return
        target = self._target(bus, device, function)
        if target is not None:
            target.config_write(offset, bytes(data))


def _ecam_decode(offset: int) -> tuple[int, int, int, int]:
    return (offset >> ECAM_BUS_SHIFT & 0xFF, offset >> ECAM_DEVICE_SHIFT & 0x1F,
            offset >> ECAM_FUNCTION_SHIFT & 0x7, offset & 0xFFF)


class PciConfigMmio:
    """The ECAM window as a bus device: offset = bus << 20 | device << 15 | function << 12 | register."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def read(self, offset: int, size: int) -> bytes:
        return self.bus.config_read(*_ecam_decode(offset), size)

    def write(self, offset: int, data: bytes) -> None:
        self.bus.config_write(*_ecam_decode(offset), data)


class PciConfigIo:
    """Ports 0xCF8..0xCFF as a bus device: CONFIG_ADDRESS at offset 0, CONFIG_DATA at 4..7."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.config_address = 0

    def _decode(self) -> tuple[int, int, int, int] | None:
        """(bus, device, function, register) of CONFIG_ADDRESS, or ``None`` when not enabled."""
        a = self.config_address
        if not a & CONFIG_ADDRESS_ENABLE:
            return None
        register = (a & 0xFC) | (a >> 24 & 0xF) << 8
        return a >> 16 & 0xFF, a >> 11 & 0x1F, a >> 8 & 0x7, register

    def _address_fault(self, what: str, offset: int, size: int) -> None:
        # Linux's pci_check_type1 writes a byte to 0xCFB while probing: routine, hence DEBUG.
        self.bus.faults.report(FAULT_KIND, "%d-byte %s at port 0xcf8+%d ignored (CONFIG_ADDRESS "
                               "takes dword accesses only)", size, what, offset, level=logging.DEBUG)

    def read(self, offset: int, size: int) -> bytes:
        if offset < CONFIG_DATA:
            if offset == CONFIG_ADDRESS and size == 4:
                return self.config_address.to_bytes(4, "little")
            self._address_fault("read", offset, size)
            return b"\xff" * size
        target = self._decode()
        if target is None:
            return b"\xff" * size
        bus, device, function, register = target
        return self.bus.config_read(bus, device, function, register + offset - CONFIG_DATA, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < CONFIG_DATA:
            if offset == CONFIG_ADDRESS and len(data) == 4:
                self.config_address = int.from_bytes(data, "little") & _CONFIG_ADDRESS_MASK
            else:
                self._address_fault("write", offset, len(data))
            return
        target = self._decode()
        if target is None:
            return
        bus, device, function, register = target
        self.bus.config_write(bus, device, function, register + offset - CONFIG_DATA, data)
