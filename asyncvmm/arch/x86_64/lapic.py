"""Local APIC set-up: LINT0 delivers ExtINT and LINT1 delivers NMI.

That is the wiring of a PC (the 8259 behind LINT0, NMI on LINT1) that guests
expect and that the MP table and MADT describe.  Works on the 1 KiB register
page of ``KVM_GET_LAPIC``; no I/O here.
"""

from __future__ import annotations

import struct

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def configure_lint(regs: bytes) -> bytes:
    """The LAPIC register page with LINT0 = ExtINT and LINT1 = NMI."""
    page = bytearray(regs)
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", page, offset)
        struct.pack_into("<I", page, offset, _set_delivery_mode(value, mode))
    return bytes(page)
