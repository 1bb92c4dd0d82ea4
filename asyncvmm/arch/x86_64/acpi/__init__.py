"""ACPI tables for an asyncvmm x86-64 guest: RSDP, XSDT, FADT, MADT, a DSDT in AML and,
with a PCI host bridge, MCFG.

Contract: :func:`create_acpi_tables` validates the machine description and
returns each table's bytes with its guest-physical address, all inside
``layout.ACPI_START .. layout.ACPI_END`` with the RSDP first (Linux finds it
there by scanning 0xE0000-0xFFFFF, or through ``boot_params.acpi_rsdp_addr``).
No I/O here; :meth:`AcpiTables.write_into` is the one line of glue that
copies them into guest memory.

The port-I/O power-management registers the FADT names are served by
:class:`asyncvmm.devices.legacy.acpi_pm.AcpiPm`; the builder must put
it on the I/O bus at ``ACPI_PM_PORT_BASE``.  With ``pci``, the caller also
reserves :attr:`PciHostBridge.ecam` in the e820 map and passes no
virtio-mmio devices (they would still be described if given, as long as
their windows stay clear of the bridge's ranges).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ....memory import GuestMemory
from .. import layout
from .dsdt import dsdt
from .pci import PciHostBridge, mcfg
from .sdt import AcpiError
from .tables import MAX_VCPUS, RSDP, fadt, madt, rsdp, xsdt

__all__ = ["AcpiError", "AcpiTables", "PciHostBridge", "create_acpi_tables", "MAX_VCPUS"]

TABLE_ALIGN = 16


@dataclass(frozen=True)
class AcpiTables:
    rsdp_addr: int
    blobs: list[tuple[int, bytes]]
    addresses: dict[str, int] = field(default_factory=dict)   # signature -> address

    def write_into(self, mem: GuestMemory) -> None:
        """Copy every table into guest memory (raises GuestMemoryError if RAM lacks the area)."""
        for addr, blob in self.blobs:
            mem.write(addr, blob)


def _align(n: int) -> int:
    return (n + TABLE_ALIGN - 1) & ~(TABLE_ALIGN - 1)


def _validate_virtio(devices: list[tuple[int, int, int]], *, serial: bool, i8042: bool,
                     pci: PciHostBridge | None) -> None:
    taken = {layout.IRQ_COM1: "COM1"} if serial else {}
    if i8042:
        taken[layout.IRQ_I8042] = "i8042"
    windows: list[tuple[int, int]] = []
    for i, (base, size, gsi) in enumerate(devices):
        if size <= 0 or base < 0 or base + size > 1 << 32:
            raise AcpiError(f"virtio device #{i}: window {base:#x}+{size:#x} is not within 4 GiB")
        if not 0 <= gsi <= layout.IRQ_LAST:
            raise AcpiError(f"virtio device #{i}: GSI {gsi} outside IOAPIC pins 0..{layout.IRQ_LAST}")
        if gsi in taken:
            raise AcpiError(f"virtio device #{i}: GSI {gsi} already used by {taken[gsi]}")
        taken[gsi] = f"virtio device #{i}"
        for b, s in windows:
            if base < b + s and b < base + size:
                raise AcpiError(f"virtio device #{i}: window {base:#x}+{size:#x} overlaps another")
        for label, b, s in pci.ranges() if pci is not None else ():
            if base < b + s and b < base + size:
                raise AcpiError(f"virtio device #{i}: window {base:#x}+{size:#x} overlaps the {label}")
        windows.append((base, size))


def create_acpi_tables(*, vcpus: int, virtio_devices: list[tuple[int, int, int]], serial: bool,
                       i8042: bool, pci: PciHostBridge | None = None) -> AcpiTables:
    """Build and place the tables for ``vcpus`` vCPUs, ``(base, size, gsi)`` virtio-mmio
    devices and, if given, the PCI host bridge ``pci`` (validated when it was built)."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise AcpiError(f"{vcpus} vCPUs: ACPI xAPIC ids allow 1..{MAX_VCPUS}")
    if pci is not None and not isinstance(pci, PciHostBridge):
        raise AcpiError(f"pci must be a PciHostBridge, not {type(pci).__name__}")
    _validate_virtio(virtio_devices, serial=serial, i8042=i8042, pci=pci)

    addresses: dict[str, int] = {"RSDP": layout.ACPI_START}
    blobs: list[tuple[int, bytes]] = []
    cursor = layout.ACPI_START + _align(RSDP.size)

    def place(signature: str, blob: bytes) -> int:
        nonlocal cursor
        addresses[signature] = cursor
        blobs.append((cursor, blob))
        cursor += _align(len(blob))
        return addresses[signature]

    dsdt_addr = place("DSDT", dsdt(virtio_devices=virtio_devices, serial=serial, i8042=i8042,
                                   pci=pci))
    listed = [place("FACP", fadt(dsdt_addr, i8042=i8042, pci=pci is not None)),
              place("APIC", madt(vcpus))]
    if pci is not None:
        listed.append(place("MCFG", mcfg(pci)))
    xsdt_addr = place("XSDT", xsdt(listed))
    if cursor > layout.ACPI_END:
        raise AcpiError(f"ACPI tables end at {cursor:#x}, beyond {layout.ACPI_END:#x}")
    blobs.insert(0, (layout.ACPI_START, rsdp(xsdt_addr)))
    return AcpiTables(rsdp_addr=layout.ACPI_START, blobs=blobs, addresses=addresses)
