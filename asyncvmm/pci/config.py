"""The configuration space of one PCI function: a type-0 header, capabilities and write masks.

Primer.  Every PCI function has a configuration space (PCI Local Bus 3.0
chapter 6; PCI Express Base 4.0 §7.5): 256 bytes in conventional PCI,
4 KiB in PCI Express, of which the first 64 bytes are the *header*.  A
type-0 header (a device, not a bridge) holds the identity (vendor, device,
class code, revision, subsystem), the COMMAND register the driver uses to
enable memory decoding and bus mastering, the read-only STATUS register,
six Base Address Registers (BARs) and a pointer to the *capability list*:
a chain of ``(id, next, body...)`` structures, each dword aligned, from
0x40 on, ending in a ``next`` of 0 (§6.7).

Which bits software may change is per bit, so the space is kept as bytes
plus a *write mask* of the same length: a guest write changes exactly the
bits whose mask bit is set (everything else is read-only, hardwired).
BAR sizing (§6.2.5.1) falls out of that: a BAR's writable bits are its
address bits above the size, so writing all ones reads back
``~(size - 1)`` with the read-only type bits in the low nibble.

Contract.  No I/O and no threads here: :class:`ConfigSpace` is plain state
owned by whoever owns the function (the loop).  :meth:`ConfigSpace.read` and
:meth:`ConfigSpace.write` accept any offset and length the guest can
produce: bytes beyond the space read as all ones and are not written.
Checking the access size and alignment is the bus's job (``bus.py``), which
reports bad accesses as guest faults.  The builder-facing methods
(:meth:`~ConfigSpace.add_bar`, :meth:`~ConfigSpace.add_capability`, ...)
raise :class:`ValueError` on misuse; that is a VMM bug, not guest input.

Names are those of Linux's ``include/uapi/linux/pci_regs.h``.
"""

from __future__ import annotations

# -- Type-0 header registers (PCI 3.0 §6.1, figure 6-1) ------------------------------------------
PCI_VENDOR_ID = 0x00            # 16 bits
PCI_DEVICE_ID = 0x02            # 16 bits
PCI_COMMAND = 0x04              # 16 bits
PCI_STATUS = 0x06               # 16 bits
PCI_CLASS_REVISION = 0x08       # revision (8) and class code (24)
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09           # programming interface
PCI_CLASS_DEVICE = 0x0A         # sub-class, base class
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_1 = 0x14
PCI_BASE_ADDRESS_2 = 0x18
PCI_BASE_ADDRESS_3 = 0x1C
PCI_BASE_ADDRESS_4 = 0x20
PCI_BASE_ADDRESS_5 = 0x24
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F

PCI_STD_HEADER_SIZEOF = 64
PCI_STD_NUM_BARS = 6
PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096

# COMMAND bits (§6.2.2)
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_SPECIAL = 0x0008
PCI_COMMAND_INVALIDATE = 0x0010
PCI_COMMAND_VGA_PALETTE = 0x0020
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_WAIT = 0x0080
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_FAST_BACK = 0x0200
PCI_COMMAND_INTX_DISABLE = 0x0400

# STATUS bits (§6.2.3)
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010

PCI_HEADER_TYPE_NORMAL = 0
PCI_HEADER_TYPE_BRIDGE = 1
PCI_HEADER_TYPE_MFD = 0x80

# BAR type bits (§6.2.5.1)
PCI_BASE_ADDRESS_SPACE = 0x01
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_SPACE_MEMORY = 0x00
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x06
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = ~0x0F

# Capability list (§6.7)
PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

# What a driver may change in COMMAND.  There are no I/O BARs, so I/O space decoding is
# hardwired to 0 (§6.2.2 allows it); memory decoding, bus mastering, parity/SERR# response
# and INTx disable are the bits Linux uses.  The rest are legacy-PCI features a PCIe
# function hardwires to 0 (PCIe 4.0 §7.5.1.1.3).
_COMMAND_WRITABLE = (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                     | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)

_CAP_START = PCI_STD_HEADER_SIZEOF
_BAR_MIN_SIZE = 16               # the low nibble holds the type bits


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ConfigSpace:
    """4 KiB configuration space of one function (type-0 header), with per-bit write masks."""

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision_id: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, header_type: int = 0,
                 interrupt_pin: int = 0) -> None:
        for name, value, bits in (("vendor_id", vendor_id, 16), ("device_id", device_id, 16),
                                  ("class_code", class_code, 24), ("revision_id", revision_id, 8),
                                  ("subsystem_vendor_id", subsystem_vendor_id, 16),
                                  ("subsystem_id", subsystem_id, 16),
                                  ("header_type", header_type, 8),
                                  ("interrupt_pin", interrupt_pin, 8)):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")
        if interrupt_pin > 4:       # 1..4 = INTA#..INTD#, 0 = none (§6.2.4)
            raise ValueError(f"interrupt_pin {interrupt_pin} is not 0 (none) or 1..4 (INTA#..INTD#)")
        self._data = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        self._wmask = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        self._set(PCI_VENDOR_ID, 2, vendor_id)
        self._set(PCI_DEVICE_ID, 2, device_id)
        self._set(PCI_REVISION_ID, 1, revision_id)
        self._set(PCI_CLASS_PROG, 3, class_code)
        self._set(PCI_HEADER_TYPE, 1, header_type)
        self._set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._set(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self._set_mask(PCI_COMMAND, 2, _COMMAND_WRITABLE)
        # Cache Line Size is read/write (§6.2.4); firmware and Linux program it.
        self._set_mask(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        # Interrupt Line is a scratch register for software (§6.2.4), even without a pin.
        self._set_mask(PCI_INTERRUPT_LINE, 1, 0xFF)
        # bar index -> (size, mem64); the high half of a 64-bit BAR is not a key
        self._bars: dict[int, tuple[int, bool]] = {}
        self._last_cap: int | None = None
        self._cap_end = _CAP_START

    # -- raw little-endian fields --------------------------------------------------------------

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset:offset + size], "little")

    def _set(self, offset: int, size: int, value: int) -> None:
        self._data[offset:offset + size] = value.to_bytes(size, "little")

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset:offset + size] = mask.to_bytes(size, "little")

    # -- BARs (§6.2.5.1) -----------------------------------------------------------------------

    def add_bar(self, index: int, size: int, *, mem64: bool = True, prefetchable: bool = False) -> None:
        """Declare memory BAR ``index`` of ``size`` bytes; a 64-bit BAR takes ``index`` and ``index+1``."""
        slots = (index, index + 1) if mem64 else (index,)
        if not 0 <= index or slots[-1] >= PCI_STD_NUM_BARS:
            raise ValueError(f"BAR {index}{' (64-bit)' if mem64 else ''} is not in 0..5")
        if any(self._bar_slot_used(i) for i in slots):
            raise ValueError(f"BAR {index} overlaps a BAR already added")
        if not _is_pow2(size) or size < _BAR_MIN_SIZE:
            raise ValueError(f"BAR size {size:#x} is not a power of two >= {_BAR_MIN_SIZE}")
        if size > (1 << 63 if mem64 else 1 << 31):
            raise ValueError(f"BAR size {size:#x} too large for a {'64' if mem64 else '32'}-bit BAR")
        type_bits = PCI_BASE_ADDRESS_SPACE_MEMORY
        type_bits |= PCI_BASE_ADDRESS_MEM_TYPE_64 if mem64 else PCI_BASE_ADDRESS_MEM_TYPE_32
        if prefetchable:
            type_bits |= PCI_BASE_ADDRESS_MEM_PREFETCH
        off = PCI_BASE_ADDRESS_0 + 4 * index
        addr_mask = ~(size - 1) & ((1 << 64) - 1 if mem64 else 0xFFFF_FFFF)
        self._set(off, 4, type_bits)
        self._set_mask(off, 4, addr_mask & 0xFFFF_FFF0)
        if mem64:
            self._set(off + 4, 4, 0)
            self._set_mask(off + 4, 4, addr_mask >> 32)
        self._bars[index] = (size, mem64)

    def _bar_slot_used(self, i: int) -> bool:
        return i in self._bars or (i - 1 in self._bars and self._bars[i - 1][1])

    def _bar(self, index: int) -> tuple[int, bool]:
        try:
            return self._bars[index]
        except KeyError:
            raise ValueError(f"no BAR {index}") from None

    def bar_address(self, index: int) -> int:
        """The programmed base of BAR ``index`` (type bits masked off)."""
        _, mem64 = self._bar(index)
        off = PCI_BASE_ADDRESS_0 + 4 * index
        return self._get(off, 8 if mem64 else 4) & PCI_BASE_ADDRESS_MEM_MASK

    def set_bar_address(self, index: int, addr: int) -> None:
        """Place BAR ``index`` at ``addr`` (the VMM's placement; aligned to the BAR's size)."""
        size, mem64 = self._bar(index)
        if addr % size or not 0 <= addr < (1 << (64 if mem64 else 32)):
            raise ValueError(f"BAR {index} of size {size:#x} cannot be at {addr:#x}")
        off = PCI_BASE_ADDRESS_0 + 4 * index
        low = self._get(off, 4)
        self._set(off, 4, (low & 0xF) | (addr & 0xFFFF_FFF0))
        if mem64:
            self._set(off + 4, 4, addr >> 32)

    def bar_size(self, index: int) -> int:
        return self._bar(index)[0]

    # -- capabilities (§6.7) -------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None) -> int:
        """Append a capability; ``writable`` is the guest write mask of ``body``, byte for byte.

        Returns the offset of the capability's ID byte.
        """
        if not 0 <= cap_id <= 0xFF:
            raise ValueError(f"capability id {cap_id:#x} is not a byte")
        if writable is None:
            writable = bytes(len(body))
        if len(writable) != len(body):
            raise ValueError(f"write mask of {len(writable)} bytes for a body of {len(body)}")
        offset = self._cap_end
        end = offset + 2 + len(body)
        # Capability pointers are 8 bits: the list lives in the first 256 bytes.
        if end > PCI_CFG_SPACE_SIZE:
            raise ValueError(f"capability {cap_id:#x} of {2 + len(body)} bytes does not fit at {offset:#x}")
        self._data[offset] = cap_id
        self._data[offset + PCI_CAP_LIST_NEXT] = 0
        self._data[offset + 2:end] = body
        self._wmask[offset + 2:end] = writable
        if self._last_cap is None:
            self._data[PCI_CAPABILITY_LIST] = offset
        else:
            self._data[self._last_cap + PCI_CAP_LIST_NEXT] = offset
        self._set(PCI_STATUS, 2, self._get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._last_cap = offset
        self._cap_end = (end + 3) & ~3
        return offset

    # -- guest accesses ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``; bytes beyond the space read as all ones."""
        if offset < 0 or size < 0:
            return b"\xff" * max(size, 0)
        data = bytes(self._data[offset:offset + size])
        return data + b"\xff" * (size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write through the write masks; bytes beyond the space are dropped."""
        if offset < 0:
            return
        for i, b in enumerate(data[:max(0, PCI_CFG_SPACE_EXP_SIZE - offset)]):
            m = self._wmask[offset + i]
            if m:
                self._data[offset + i] = (self._data[offset + i] & ~m) | (b & m)

    @property
    def command(self) -> int:
        return self._get(PCI_COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(PCI_STATUS, 2)

    @property
    def memory_enabled(self) -> bool:
        """COMMAND.Memory Space: the function decodes its memory BARs (§6.2.2)."""
        return bool(self.command & PCI_COMMAND_MEMORY)

    @property
    def bus_master_enabled(self) -> bool:
        """COMMAND.Bus Master: the function may issue memory requests, MSI(-X) included (§6.2.2)."""
        return bool(self.command & PCI_COMMAND_MASTER)

    # -- snapshots -----------------------------------------------------------------------------

    def state(self) -> bytes:
        """The whole space, for a snapshot."""
        return bytes(self._data)

    def restore(self, raw: bytes) -> None:
        """Load a snapshot's space into this (freshly built, identical) function.

        The snapshot is untrusted: it must be 4 KiB and agree with this function in
        every read-only bit (identity, BAR types, capability list), so only what a
        guest could have written is taken from it.
        """
        if len(raw) != PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError(f"PCI configuration space of {len(raw)} bytes, not {PCI_CFG_SPACE_EXP_SIZE}")
        for i, (old, new, m) in enumerate(zip(self._data, raw, self._wmask)):
            if (old ^ new) & ~m & 0xFF:
                raise ValueError(f"PCI configuration space differs in read-only bits at {i:#x}: "
                                 f"{new:#04x} where this function has {old:#04x}")
        self._data[:] = raw
