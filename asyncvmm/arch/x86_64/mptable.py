"""The Intel MultiProcessor Specification 1.4 table, for guests built without ACPI.

Contract: :func:`create_mptable` returns the guest-physical address and the
bytes of the MP floating pointer structure followed by the MP configuration
table; no I/O.  The builder writes them at ``layout.EBDA_START``, where
Linux's ``smp_scan_config`` finds the pointer (it scans the last KiB of
base memory).  Too many vCPUs for the 1 KiB below ``layout.LOW_RAM_END``
raise :class:`MpTableError`.

Primer (MP spec 1.4, chapter 4):

* Floating pointer (16 bytes): ``_MP_``, the table's physical address, its
  own length in 16-byte units (1), spec revision 4, a checksum, and feature
  bytes (0: a configuration table is present; IMCR absent, virtual-wire mode).
* Configuration table header (44 bytes): ``PCMP``, base table length, spec
  revision, checksum, OEM and product ids, entry count, local APIC address.
* Entries, in type order: processor (20 bytes, one per vCPU, BP flag on the
  first), bus (8: one ISA bus), I/O APIC (8), I/O interrupt assignment (8:
  ISA IRQs 0-15 and the virtio GSIs above 15 onto IOAPIC pins) and local
  interrupt assignment (8: LINT0 ExtINT, LINT1 NMI on every CPU).

Each ISA IRQ n goes to IOAPIC pin n: that is KVM's default GSI routing, so no
IRQ0-to-pin-2 override is described.  Virtio GSIs above 15 are listed on the
ISA bus with explicit edge/active-high flags, matching the edge-triggered
virtio-mmio interrupt and the DSDT's description of the same devices.
"""

from __future__ import annotations

import struct
from typing import Iterable

from . import layout
from .acpi.tables import ioapic_id

MP_SPEC_REV = 4                  # MP spec 1.4
FLOATING_POINTER = struct.Struct("<4sIBBB5s")          # 16 bytes
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")    # 44 bytes
PROCESSOR = struct.Struct("<BBBBII8s")                 # 20 bytes
BUS = struct.Struct("<BB6s")                           # 8 bytes
IOAPIC = struct.Struct("<BBBBI")                       # 8 bytes
INTERRUPT = struct.Struct("<BBHBBBB")                  # 8 bytes: I/O and local interrupt entries

MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
MPC_APIC_USABLE = 1 << 0

MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQPOL_ACTIVE_HIGH = 0b01
MP_IRQTRIG_EDGE = 0b01 << 2

# Values a real part would report; Linux only warns about an APIC version of 0.
APIC_VERSION = 0x14              # integrated local APIC (what KVM's LAPIC reports)
IOAPIC_VERSION = 0x11            # 82093AA-compatible (what KVM's IOAPIC reports)
CPU_SIGNATURE = 0x600            # family 6; model and stepping left 0
CPU_FEATURES = (1 << 0) | (1 << 9)   # CPUID.1:EDX FPU and APIC

BUS_ID_ISA = 0
ISA_IRQS = 16
OEM_ID = b"ASYVMM  "
PRODUCT_ID = b"ASYNCVMM    "
LOCAL_APIC_ALL = 0xFF

_MAX_ADDR = layout.LOW_RAM_END


class MpTableError(ValueError):
    """A machine description that does not fit the MP table."""


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def _entries(vcpus: int, extra_gsis: list[int]) -> list[bytes]:
    apic = ioapic_id(vcpus)
    entries = []
    for cpu in range(vcpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(PROCESSOR.pack(MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE,
                                      CPU_FEATURES, bytes(8)))
    entries.append(BUS.pack(MP_BUS, BUS_ID_ISA, b"ISA   "))
    entries.append(IOAPIC.pack(MP_IOAPIC, apic, IOAPIC_VERSION, MPC_APIC_USABLE, layout.IOAPIC_ADDR))
    for irq in range(ISA_IRQS):   # flags 0: polarity and trigger conform to the ISA bus
        entries.append(INTERRUPT.pack(MP_INTSRC, MP_INT, 0, BUS_ID_ISA, irq, apic, irq))
    for gsi in extra_gsis:
        entries.append(INTERRUPT.pack(MP_INTSRC, MP_INT, MP_IRQPOL_ACTIVE_HIGH | MP_IRQTRIG_EDGE,
                                      BUS_ID_ISA, gsi, apic, gsi))
    entries.append(INTERRUPT.pack(MP_LINTSRC, MP_EXTINT, 0, BUS_ID_ISA, 0, LOCAL_APIC_ALL, 0))
    entries.append(INTERRUPT.pack(MP_LINTSRC, MP_NMI, 0, BUS_ID_ISA, 0, LOCAL_APIC_ALL, 1))
    return entries


def _validate(vcpus: int, extra_gsis: Iterable[int]) -> list[int]:
    if not 1 <= vcpus <= 254:
        raise MpTableError(f"{vcpus} vCPUs: the MP table supports 1..254 (8-bit APIC ids)")
    gsis = sorted(set(extra_gsis))
    for gsi in gsis:
        if not 0 <= gsi <= layout.IRQ_LAST:
            raise MpTableError(f"GSI {gsi} outside IOAPIC pins 0..{layout.IRQ_LAST}")
    # ISA IRQs are listed already; only pins above them need entries of their own.
    return [g for g in gsis if g >= ISA_IRQS]


def create_mptable(*, vcpus: int, extra_gsis: Iterable[int] = ()) -> tuple[int, bytes]:
    """``(address, bytes)`` of the floating pointer and configuration table for ``vcpus``."""
    entries = _entries(vcpus, _validate(vcpus, extra_gsis))
    addr = layout.EBDA_START
    table_addr = addr + FLOATING_POINTER.size
    body = b"".join(entries)
    length = CONFIG_HEADER.size + len(body)
    if table_addr + length > _MAX_ADDR:
        raise MpTableError(f"MP table for {vcpus} vCPUs needs {FLOATING_POINTER.size + length} "
                           f"bytes, more than the {_MAX_ADDR - addr} below {_MAX_ADDR:#x}")
    header = bytearray(CONFIG_HEADER.pack(b"PCMP", length, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID,
                                          0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0))
    header[7] = _checksum(header + body)
    pointer = bytearray(FLOATING_POINTER.pack(b"_MP_", table_addr, 1, MP_SPEC_REV, 0, bytes(5)))
    pointer[10] = _checksum(pointer)
    return addr, bytes(pointer) + bytes(header) + body
