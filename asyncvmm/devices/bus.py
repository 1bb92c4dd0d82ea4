"""Address-range dispatch of guest port-I/O and MMIO accesses to devices.

:meth:`Bus.read` and :meth:`Bus.write` find the device whose range holds the
address and call it, on the calling thread, with the offset into that range.
Which thread that is depends on the bus (the builder decides, see
``docs/architecture.md``):

* the port-I/O bus is called by vCPU threads directly: legacy devices (UART
  bytes, i8042) answer short and synchronously there, and the bus holds the
  device's own lock (``locked=True``) so that two vCPUs never run one
  device's register code at once;
* the MMIO bus belongs to the asyncio loop: a vCPU thread hands each access
  to the loop and waits for the answer (``vcpu.py``), so its devices need no
  locks (``locked=False``).  A device may answer a few registers on the vCPU
  thread itself through :class:`InlineRegisters` (virtio-mmio's
  InterruptStatus/ACK, see ``mmio.py``); :meth:`Bus.read_inline` /
  :meth:`Bus.write_inline` ask it.

An access no device claims reads as all ones and is reported as a guest
fault (counted, and logged only a few times).  Nothing here knows about KVM.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import ContextManager, Protocol

from asyncvmm import guestfault

_NO_LOCK = contextlib.nullcontext()


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` into the device's range."""

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset`` into the device's range."""


class InlineRegisters(Protocol):
    """Registers a loop-owned device answers on the accessing vCPU thread (its own locking)."""

    def read_inline(self, offset: int, size: int) -> bytes | None:
        """The answer, or ``None``: this access must go to the device's owner."""

    def write_inline(self, offset: int, data: bytes) -> bool:
        """``True`` if handled here; ``False``: this access must go to the device's owner."""


class BusError(Exception):
    pass


@dataclass(eq=False)
class _Entry:
    base: int
    length: int
    device: BusDevice
    lock: ContextManager

    def __post_init__(self) -> None:
        self.read_inline = getattr(self.device, "read_inline", None)
        self.write_inline = getattr(self.device, "write_inline", None)


class Bus:
    """A sorted, non-overlapping map of ``[base, base+length)`` to devices."""

    def __init__(self, name: str, *, locked: bool = True,
                 faults: guestfault.GuestFaults | None = None) -> None:
        self.name = name
        self._locked = locked
        self._faults = faults or guestfault.DEFAULT
        self._fault_kind = f"{name}_unclaimed"
        # (bases, entries), replaced whole on insert/remove: vCPU threads look up while the
        # owner hot-plugs, and one attribute read gives them one consistent table.
        self._table: tuple[list[int], list[_Entry]] = ([], [])

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        bases, entries = self._table
        i = bisect.bisect_right(bases, base)
        if i > 0 and entries[i - 1].base + entries[i - 1].length > base:
            raise BusError(f"{self.name}: range {base:#x}+{length:#x} overlaps")
        if i < len(entries) and base + length > entries[i].base:
            raise BusError(f"{self.name}: range {base:#x}+{length:#x} overlaps")
        lock = threading.Lock() if self._locked else _NO_LOCK
        self._table = ([*bases[:i], base, *bases[i:]],
                       [*entries[:i], _Entry(base, length, device, lock), *entries[i:]])

    def remove(self, base: int) -> BusDevice:
        """Take out the device inserted at ``base`` and return it; :class:`BusError` if none is."""
        bases, entries = self._table
        i = bisect.bisect_left(bases, base)
        if i == len(bases) or bases[i] != base:
            raise BusError(f"{self.name}: no device at {base:#x}")
        self._table = (bases[:i] + bases[i + 1:], entries[:i] + entries[i + 1:])
        return entries[i].device

    def _lookup(self, addr: int, size: int) -> _Entry | None:
        bases, entries = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        e = entries[i]
        if addr + size > e.base + e.length:
            return None
        return e

    def device_at(self, addr: int) -> BusDevice | None:
        e = self._lookup(addr, 1)
        return e.device if e else None

    def _unclaimed(self, what: str, addr: int, size: int) -> None:
        # Linux probes absent legacy ports at every boot: those are routine, hence DEBUG.
        level = logging.DEBUG if self.name == "pio" else logging.WARNING
        self._faults.report(self._fault_kind, "%d-byte %s at %#x: no device", size, what, addr,
                            level=level)

    def read(self, addr: int, size: int) -> bytes:
        """The device's answer; all ones when no device claims the range."""
        e = self._lookup(addr, size)
        if e is None:
            self._unclaimed("read", addr, size)
            return b"\xff" * size
        with e.lock:
            data = e.device.read(addr - e.base, size)
        if len(data) != size:
            data = bytes(data[:size]).ljust(size, b"\xff")
        return data

    def write(self, addr: int, data: bytes) -> bool:
        """``False`` when no device claims the range (the write is dropped)."""
        e = self._lookup(addr, len(data))
        if e is None:
            self._unclaimed("write", addr, len(data))
            return False
        with e.lock:
            e.device.write(addr - e.base, data)
        return True

    # -- the vCPU-thread side of a loop-owned bus ---------------------------------

    def read_inline(self, addr: int, size: int) -> bytes | None:
        """The device's inline answer, or ``None`` when the access must go to the loop."""
        e = self._lookup(addr, size)
        if e is None or e.read_inline is None:
            return None
        return e.read_inline(addr - e.base, size)

    def write_inline(self, addr: int, data: bytes) -> bool:
        """``True`` when the device handled the write inline."""
        e = self._lookup(addr, len(data))
        if e is None or e.write_inline is None:
            return False
        return e.write_inline(addr - e.base, data)
