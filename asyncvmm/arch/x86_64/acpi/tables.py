"""The fixed-format ACPI tables: RSDP, XSDT, FADT and MADT (MCFG lives in pci.py).

Contract: pure functions returning table bytes for given guest-physical
addresses; no I/O.  Field layouts and section numbers are those of ACPI 6.4;
the FADT is revision 6 with minor version 3 (ACPI 6.3), the newest that the
Debian-packaged iasl decodes in full.

Why the FADT looks the way it does (what Linux reads from it):

* ``HW_REDUCED_ACPI``: there is no PM1 event/control block, PM timer, GPE
  block, SCI or SMI port to emulate.  Linux then runs
  ``acpi_generic_reduced_hw_init``: no legacy PIC (``null_legacy_pic``) and no
  PIT/HPET timer setup, and it powers off through SLEEP_CONTROL_REG.
* IAPC_BOOT_ARCH: ``acpi_parse_fadt`` marks the i8042 firmware-absent unless
  the 8042 bit is set (FADT revision >= 3), and the i8042 driver then probes
  only a PNP0303 device; with the bit set it probes ports 0x60/0x64 anyway,
  which is what Ctrl-Alt-Del injection needs.  "VGA Not Present" sets
  ``x86_platform.legacy.no_vga``; "CMOS RTC Not Present" stops Linux
  registering an RTC platform device for ports 0x70/0x71 that nothing serves.
  Without a PCI bus, "MSI Not Supported" (Linux would call ``pci_no_msi``);
  with one, that flag must be clear, and "PCIe ASPM Controls" is set so that
  Linux leaves link power management alone ("FADT indicates ASPM is
  unsupported, using BIOS configuration"): there are no links to manage.
* RESET_REG: a byte write of 0xFE to system I/O port 0x64, the i8042's pulse
  reset line, so ``reboot=acpi`` (Linux's first choice on x86) ends in the
  same VM exit as the keyboard-controller reset.
"""

from __future__ import annotations

import struct
from typing import Iterable

from ....devices.legacy.acpi_pm import SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT
from .. import layout
from .sdt import OEM_ID, AcpiError, checksum, gas_io, sdt

# -- RSDP (5.2.5.3) ---------------------------------------------------------------

RSDP_SIGNATURE = b"RSD PTR "
RSDP = struct.Struct("<8sB6sBIIQB3s")      # 36 bytes
RSDP_V1_LENGTH = 20                        # the part the first checksum covers
RSDP_REVISION = 2                          # ACPI 2.0+: has XsdtAddress


def rsdp(xsdt_addr: int) -> bytes:
    """An ACPI 2.0+ RSDP pointing at the XSDT (no RSDT: every 64-bit OS reads the XSDT)."""
    raw = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size, xsdt_addr,
                              0, bytes(3)))
    raw[8] = checksum(raw[:RSDP_V1_LENGTH])
    raw[32] = checksum(raw)
    return bytes(raw)


# -- XSDT (5.2.8) -------------------------------------------------------------------

XSDT_REVISION = 1


def xsdt(table_addrs: Iterable[int]) -> bytes:
    """The XSDT: 64-bit addresses of every table except the DSDT (the FADT points at that)."""
    return sdt(b"XSDT", XSDT_REVISION, b"AVMMXSDT", b"".join(struct.pack("<Q", a) for a in table_addrs))


# -- FADT (5.2.9) -------------------------------------------------------------------

FADT_REVISION = 6
FADT_MINOR_REVISION = 3
FADT_LENGTH = 276

# Fixed feature flags (Table 5.10).
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4         # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5         # no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (5.2.9.3, Table 5.11).
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS = 1 << 4   # set: OSPM must not enable ASPM control
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5

RESET_PORT = 0x64                # i8042 command port
RESET_VALUE = 0xFE               # i8042 "pulse output line 0": CPU reset

# Offsets of the fields we set (Table 5.9); everything else is zero.
_FADT_DSDT = 40
_FADT_IAPC_BOOT_ARCH = 109
_FADT_FLAGS = 112
_FADT_RESET_REG = 116
_FADT_RESET_VALUE = 128
_FADT_MINOR_VERSION = 131
_FADT_X_DSDT = 140
_FADT_SLEEP_CONTROL_REG = 244
_FADT_SLEEP_STATUS_REG = 256


def fadt(dsdt_addr: int, *, i8042: bool, pci: bool = False) -> bytes:
    """A hardware-reduced revision-6 FADT; the reset register only when an i8042 serves it,
    MSI allowed only when there is a ``pci`` bus."""
    if not 0 < dsdt_addr < 1 << 32:
        raise AcpiError(f"DSDT address {dsdt_addr:#x} does not fit the 32-bit DSDT field")
    body = bytearray(FADT_LENGTH - 36)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    flags = FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_HW_REDUCED_ACPI
    boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    boot_arch |= IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS if pci else IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
    if i8042:
        flags |= FADT_RESET_REG_SUP
        boot_arch |= IAPC_BOOT_ARCH_8042
        put(_FADT_RESET_REG, "12s", gas_io(RESET_PORT))
        put(_FADT_RESET_VALUE, "B", RESET_VALUE)
    # Both DSDT fields hold the same address: ACPICA warns when they differ.
    put(_FADT_DSDT, "<I", dsdt_addr)
    put(_FADT_X_DSDT, "<Q", dsdt_addr)
    put(_FADT_IAPC_BOOT_ARCH, "<H", boot_arch)
    put(_FADT_FLAGS, "<I", flags)
    put(_FADT_MINOR_VERSION, "B", FADT_MINOR_REVISION)
    put(_FADT_SLEEP_CONTROL_REG, "12s", gas_io(SLEEP_CONTROL_PORT))
    put(_FADT_SLEEP_STATUS_REG, "12s", gas_io(SLEEP_STATUS_PORT))
    return sdt(b"FACP", FADT_REVISION, b"AVMMFACP", bytes(body))


# -- MADT (5.2.12) ------------------------------------------------------------------

MADT_REVISION = 5                # ACPI 6.3
MADT_PCAT_COMPAT = 1 << 0
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF            # ACPI Processor UID meaning "every processor"
MPS_INTI_ACTIVE_HIGH_EDGE = 0x0005   # polarity 01 (high), trigger 01 (edge)

MAX_VCPUS = 254                  # xAPIC ids 0..253, 254 for the IOAPIC, 255 is broadcast


def ioapic_id(vcpus: int) -> int:
    """The IOAPIC's APIC id: the first id after the vCPUs' (shared with the MP table)."""
    return vcpus


def madt(vcpus: int) -> bytes:
    """Local APIC address, one enabled Processor Local APIC per vCPU, the IOAPIC, LINT1 as NMI.

    PCAT_COMPAT stays clear: in hardware-reduced mode Linux uses no 8259
    PIC, so the table does not claim one.  No Interrupt Source Overrides:
    KVM's default routing wires GSI n to IOAPIC pin n for ISA IRQs, which is
    what an OS assumes without overrides.
    """
    if not 1 <= vcpus <= MAX_VCPUS:
        raise AcpiError(f"{vcpus} vCPUs: the MADT supports 1..{MAX_VCPUS} (8-bit xAPIC ids)")
    parts = [struct.pack("<II", layout.LAPIC_ADDR, 0)]
    for cpu in range(vcpus):
        parts.append(struct.pack("<BBBBI", MADT_TYPE_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED))
    parts.append(struct.pack("<BBBBII", MADT_TYPE_IO_APIC, 12, ioapic_id(vcpus), 0,
                             layout.IOAPIC_ADDR, 0))
    parts.append(struct.pack("<BBBHB", MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS,
                             MPS_INTI_ACTIVE_HIGH_EDGE, 1))
    return sdt(b"APIC", MADT_REVISION, b"AVMMAPIC", b"".join(parts))
