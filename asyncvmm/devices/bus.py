"""Address-range dispatch of guest port-I/O and MMIO accesses to devices.

A vCPU thread that exits on an access calls :meth:`Bus.read` or
:meth:`Bus.write`; the bus finds the device whose range holds the address and
calls it with the offset into that range, holding the device's own lock so
that two vCPUs never run one device's register code at once.  Register
handlers must be quick: anything slow is posted to the asyncio loop.

Devices implement :class:`BusDevice`; nothing here knows about KVM.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` into the device's range."""

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset`` into the device's range."""


class BusError(Exception):
    pass


@dataclass(eq=False)
class _Entry:
    base: int
    length: int
    device: BusDevice
    lock: threading.Lock = field(default_factory=threading.Lock)


class Bus:
    """A sorted, non-overlapping map of ``[base, base+length)`` to devices."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: list[_Entry] = []
        self._bases: list[int] = []

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._entries[i - 1].base + self._entries[i - 1].length > base:
            raise BusError(f"{self.name}: range {base:#x}+{length:#x} overlaps")
        if i < len(self._entries) and base + length > self._entries[i].base:
            raise BusError(f"{self.name}: range {base:#x}+{length:#x} overlaps")
        self._entries.insert(i, _Entry(base, length, device))
        self._bases.insert(i, base)

    def _lookup(self, addr: int, size: int) -> _Entry | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        e = self._entries[i]
        if addr + size > e.base + e.length:
            return None
        return e

    def device_at(self, addr: int) -> BusDevice | None:
        e = self._lookup(addr, 1)
        return e.device if e else None

    def read(self, addr: int, size: int) -> bytes | None:
        """The device's answer, or ``None`` when no device claims the range."""
        e = self._lookup(addr, size)
        if e is None:
            return None
        with e.lock:
            data = e.device.read(addr - e.base, size)
        if len(data) != size:
            data = bytes(data[:size]).ljust(size, b"\xff")
        return data

    def write(self, addr: int, data: bytes) -> bool:
        """``False`` when no device claims the range (the write is dropped)."""
        e = self._lookup(addr, len(data))
        if e is None:
            return False
        with e.lock:
            e.device.write(addr - e.base, data)
        return True
