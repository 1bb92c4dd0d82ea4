"""MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending bits.

Primer.  A function with MSI-X has a capability in its configuration space
whose body is Message Control (16 bits: table size N-1 in bits 10:0,
read-only; Function Mask bit 14; MSI-X Enable bit 15), then two dwords
naming where the table and the Pending Bit Array live: a BAR index (BIR) in
bits 2:0 and a QWORD-aligned offset into that BAR in the rest (§6.8.2.4,
§6.8.2.5).  The table has 16 bytes per vector (§6.8.2.6-§6.8.2.9)::

    0x0 Message Address (low 32 bits)   0x4 Message Upper Address
    0x8 Message Data                    0xC Vector Control (bit 0: Mask Bit)

and the PBA one bit per vector in QWORDs (§6.8.2.10).  A vector is sent
only while MSI-X is enabled and neither the Function Mask nor its own Mask
Bit is set; an event on a masked vector sets its pending bit instead, and
unmasking a pending vector sends it and clears the bit (§6.8.3.4).  Every
Mask Bit is set after reset.

Contract.  :class:`Msix` is sans-I/O state owned by the transport (the loop
thread).  Sending is the caller's ``deliver(vector)`` (the glue writes the
vector's irqfd); ``on_route_change(vector)`` says that vector's address/data
or its effective mask changed, so the glue can re-route its GSI.  Message
Control lives in the configuration space (the capability body comes from
:meth:`Msix.capability`); the owner hands each new value to
:meth:`Msix.control_written`.  The table and PBA accept only aligned DWORD
or QWORD accesses (§6.8.2: "software must use aligned full DWORD or aligned
full QWORD transactions"); anything else, an offset past the end and a
write to the read-only PBA are ignored (reads answer zeros) and reported to
the :class:`~asyncvmm.guestfault.GuestFaults`.
"""

from __future__ import annotations

from typing import Callable

import msgspec

from asyncvmm import guestfault

PCI_MSIX_FLAGS = 2                      # Message Control, relative to the capability
PCI_MSIX_FLAGS_QSIZE = 0x07FF           # table size - 1, read-only
PCI_MSIX_FLAGS_MASKALL = 0x4000         # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000          # MSI-X Enable
PCI_MSIX_TABLE = 4                      # Table Offset/Table BIR, relative to the capability
PCI_MSIX_PBA = 8                        # PBA Offset/PBA BIR
PCI_MSIX_TABLE_BIR = 0x7

PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0x0
PCI_MSIX_ENTRY_UPPER_ADDR = 0x4
PCI_MSIX_ENTRY_DATA = 0x8
PCI_MSIX_ENTRY_VECTOR_CTRL = 0xC
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

MSIX_MAX_VECTORS = 2048                 # an 11-bit table size (§6.8.2.3)

_FAULT = "pci_msix"


class MsixState(msgspec.Struct, forbid_unknown_fields=True):
    """MSI-X in a snapshot (untrusted on load: :meth:`Msix.restore` checks it)."""

    enabled: bool
    function_mask: bool
    # Per vector: (Message Address, Message Data, Vector Control), the address 64 bits.
    table: list[tuple[int, int, int]]
    pending: int                        # the PBA as one integer, bit v for vector v


class Msix:
    """An MSI-X table + PBA (PCI 3.0 §6.8.2) for ``num_vectors`` vectors; sans-I/O."""

    def __init__(self, num_vectors: int, *, deliver: Callable[[int], None],
                 on_route_change: Callable[[int], None],
                 faults: guestfault.GuestFaults | None = None) -> None:
        if not 1 <= num_vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"{num_vectors} MSI-X vectors; a table has 1..{MSIX_MAX_VECTORS}")
        self.num_vectors = num_vectors
        self._deliver = deliver
        self._on_route_change = on_route_change
        self.faults = faults or guestfault.DEFAULT
        self.enabled = False
        self.function_mask = False
        # Per vector: [Message Address (64-bit), Message Data, Vector Control].
        self._table = [[0, 0, PCI_MSIX_ENTRY_CTRL_MASKBIT] for _ in range(num_vectors)]
        self._pending = 0

    @property
    def table_size(self) -> int:
        """Bytes of the table."""
        return PCI_MSIX_ENTRY_SIZE * self.num_vectors

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA: whole QWORDs (§6.8.2.10)."""
        return 8 * ((self.num_vectors + 63) // 64)

    # -- the capability (§6.8.2.1-§6.8.2.5) ------------------------------------

    def capability(self, *, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
                   ) -> tuple[bytes, bytes]:
        """``(body, writable)`` for ``ConfigSpace.add_capability(PCI_CAP_ID_MSIX, ...)``.

        Only Function Mask and MSI-X Enable are writable.
        """
        for name, bar, offset in (("table", table_bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= bar <= 5 or offset % 8 or not 0 <= offset < 1 << 32:
                raise ValueError(f"MSI-X {name} in BAR {bar} at {offset:#x}: needs BAR 0..5 and a "
                                 "QWORD-aligned 32-bit offset")
        control = self.num_vectors - 1
        body = (control.to_bytes(2, "little") + (table_offset | table_bar).to_bytes(4, "little")
                + (pba_offset | pba_bar).to_bytes(4, "little"))
        writable = (PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE).to_bytes(2, "little") + bytes(8)
        return body, writable

    def control_written(self, value: int) -> None:
        """Message Control now reads ``value`` (enable bit 15, function mask bit 14)."""
        enabled = bool(value & PCI_MSIX_FLAGS_ENABLE)
        function_mask = bool(value & PCI_MSIX_FLAGS_MASKALL)
        if (enabled, function_mask) == (self.enabled, self.function_mask):
            return
        self.enabled, self.function_mask = enabled, function_mask
        for v in range(self.num_vectors):
            self._on_route_change(v)
        self._send_pending()

    # -- vectors -------------------------------------------------------------

    def message(self, vector: int) -> tuple[int, int]:
        """``(address, data)`` of ``vector``'s table entry."""
        address, data, _ = self._table[vector]
        return address, data

    def masked(self, vector: int) -> bool:
        """The vector's Mask Bit or the Function Mask is set."""
        return self.function_mask or bool(self._table[vector][2] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def trigger(self, vector: int) -> None:
        """An event for ``vector``: send it, or set its pending bit if masked / not enabled.

        ``vector`` is the VMM's choice (the transport refuses guest vectors beyond the
        table), so one out of range is a VMM bug: :class:`IndexError`.
        """
        if not 0 <= vector < self.num_vectors:
            raise IndexError(f"MSI-X vector {vector} of {self.num_vectors}")
        if self.enabled and not self.masked(vector):
            self._deliver(vector)
        else:
            self._pending |= 1 << vector

    def _send_pending(self) -> None:
        """§6.8.3.4: a pending vector that is no longer masked is sent now."""
        if not self.enabled or self.function_mask:
            return
        pending = self._pending
        while pending:
            v = (pending & -pending).bit_length() - 1
            pending &= pending - 1
            if not self.masked(v):
                self._pending &= ~(1 << v)
                self._deliver(v)

    # -- the table and the PBA (BAR accesses) --------------------------------

    def _check(self, what: str, offset: int, size: int, limit: int) -> bool:
        if size not in (4, 8) or offset % size:
            self.faults.report(_FAULT, "MSI-X %s: %d-byte access at %#x is not an aligned DWORD or "
                               "QWORD; ignored", what, size, offset)
            return False
        if not 0 <= offset <= limit - size:
            self.faults.report(_FAULT, "MSI-X %s: access at %#x+%d beyond its %#x bytes; ignored",
                               what, offset, size, limit)
            return False
        return True

    def _dword(self, index: int) -> int:
        address, data, control = self._table[index // 4]
        return (address & 0xFFFF_FFFF, address >> 32, data, control)[index % 4]

    def read_table(self, offset: int, size: int) -> bytes:
        if not self._check("table", offset, size, self.table_size):
            return bytes(size)
        first = offset // 4
        return b"".join(self._dword(i).to_bytes(4, "little") for i in range(first, first + size // 4))

    def write_table(self, offset: int, data: bytes) -> None:
        if not self._check("table", offset, len(data), self.table_size):
            return
        vector = offset // PCI_MSIX_ENTRY_SIZE
        entry = self._table[vector]
        was_masked = self.masked(vector)
        old = list(entry)
        for i in range(len(data) // 4):
            value = int.from_bytes(data[4 * i:4 * i + 4], "little")
            field = (offset + 4 * i) % PCI_MSIX_ENTRY_SIZE
            if field == PCI_MSIX_ENTRY_LOWER_ADDR:
                entry[0] = (entry[0] & ~0xFFFF_FFFF) | value
            elif field == PCI_MSIX_ENTRY_UPPER_ADDR:
                entry[0] = (entry[0] & 0xFFFF_FFFF) | value << 32
            elif field == PCI_MSIX_ENTRY_DATA:
                entry[1] = value
            else:
                # Bits 31:1 are reserved (§6.8.2.9): kept zero.
                entry[2] = value & PCI_MSIX_ENTRY_CTRL_MASKBIT
        if entry != old:
            self._on_route_change(vector)
        if was_masked and not self.masked(vector):
            self._send_pending()

    def read_pba(self, offset: int, size: int) -> bytes:
        if not self._check("PBA", offset, size, self.pba_size):
            return bytes(size)
        return (self._pending >> (8 * offset) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write_pba(self, offset: int, data: bytes) -> None:
        """The PBA is read-only (§6.8.2.10): every write is ignored and reported."""
        self.faults.report(_FAULT, "MSI-X PBA: %d-byte write at %#x to the read-only PBA ignored",
                           len(data), offset)

    # -- snapshots -------------------------------------------------------------

    def state(self) -> MsixState:
        return MsixState(enabled=self.enabled, function_mask=self.function_mask,
                         table=[tuple(entry) for entry in self._table], pending=self._pending)

    def restore(self, state: MsixState) -> None:
        """Take a snapshot's MSI-X state (checked), then report every vector's route as changed.

        Raises :class:`ValueError` if it does not fit this table; nothing is changed then.
        """
        if len(state.table) != self.num_vectors:
            raise ValueError(f"MSI-X state of {len(state.table)} vectors for a table of {self.num_vectors}")
        for v, (address, data, control) in enumerate(state.table):
            if (not 0 <= address < 1 << 64 or not 0 <= data <= 0xFFFF_FFFF
                    or control not in (0, PCI_MSIX_ENTRY_CTRL_MASKBIT)):
                raise ValueError(f"MSI-X state: vector {v} entry out of range")
        if not 0 <= state.pending < 1 << self.num_vectors:
            raise ValueError("MSI-X state: pending bits beyond the table")
        self.enabled = state.enabled
        self.function_mask = state.function_mask
        self._table = [list(entry) for entry in state.table]
        self._pending = state.pending
        for v in range(self.num_vectors):
            self._on_route_change(v)
