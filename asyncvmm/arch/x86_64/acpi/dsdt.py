"""The DSDT: the devices a guest cannot discover by probing, in AML.

Contract: :func:`dsdt` returns the complete table (header and checksum
included); no I/O.  Its namespace is::

    \\_S5_                 Package {S5_SLP_TYP, 0, 0, 0}: offers ACPI power-off (ACPI 6.4 section 7.4.2)
    \\_SB_.COM1            PNP0501, IO 0x3F8/8, IRQ 4          (when there is a serial port)
    \\_SB_.PS2K            PNP0303, IO 0x60 and 0x64, IRQ 1    (when there is an i8042)
    \\_SB_.VRnn            LNRO0005 per virtio-mmio device: its 4 KiB window and an
                           edge-triggered, active-high, exclusive interrupt
    \\_SB_.PC00            PNP0A08 PCI Express host bridge: bus range, 0xCF8/8, its
                           memory windows                       (with PCI, see pci.py)
    \\_SB_.MRES            PNP0C02 motherboard resource: the ECAM (with PCI)

``LNRO0005`` is the id Linux's virtio_mmio driver matches in its ACPI table;
it is how kernels without ``VIRTIO_MMIO_CMDLINE_DEVICES`` (Debian's) find
the devices.  The ISA devices use the classic IRQNoFlags form, which Linux's
PNP ACPI layer reads as edge, active-high.
"""

from __future__ import annotations

from ....devices.legacy.acpi_pm import S5_SLP_TYP
from .. import layout
from . import aml
from .resources import extended_interrupt, io, irq, memory32_fixed, resource_template
from .pci import PciHostBridge, pci_devices
from .sdt import sdt

DSDT_REVISION = 2                # 2 and above: AML integers are 64 bits
VIRTIO_MMIO_HID = "LNRO0005"
COM1_HID = "PNP0501"             # 16550A-compatible COM port
I8042_KBD_HID = "PNP0303"        # IBM Enhanced (101/102-key, PS/2 mouse support) keyboard controller
COM1_IO_LEN = 8


def virtio_device_name(index: int) -> str:
    """The 4-character AML name of the ``index``-th virtio-mmio device."""
    return f"VR{index:02X}"


def _s5() -> bytes:
    # SLP_TYPa, SLP_TYPb, two reserved; hardware-reduced OSPM uses SLP_TYPa only.
    return aml.name("\\_S5_", aml.package(aml.integer(S5_SLP_TYP), aml.integer(0),
                                          aml.integer(0), aml.integer(0)))


def _com1() -> bytes:
    crs = resource_template(io(layout.COM1_PORT, layout.COM1_PORT, 1, COM1_IO_LEN),
                            irq(layout.IRQ_COM1))
    return aml.device("COM1", aml.name("_HID", aml.eisa_id(COM1_HID)),
                      aml.name("_UID", aml.integer(1)), aml.name("_CRS", crs))


def _i8042() -> bytes:
    data, command = layout.I8042_PORT, layout.I8042_PORT + 4
    # Two one-byte ranges, data port first: Linux's i8042 PNP probe takes
    # port resource 0 as the data register and resource 1 as command/status.
    crs = resource_template(io(data, data, 1, 1), io(command, command, 1, 1),
                            irq(layout.IRQ_I8042))
    return aml.device("PS2K", aml.name("_HID", aml.eisa_id(I8042_KBD_HID)),
                      aml.name("_UID", aml.integer(0)), aml.name("_CRS", crs))


def _virtio(index: int, base: int, size: int, gsi: int) -> bytes:
    crs = resource_template(memory32_fixed(base, size),
                            extended_interrupt(gsi, edge=True, active_low=False, shared=False))
    return aml.device(virtio_device_name(index), aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
                      aml.name("_UID", aml.integer(index)), aml.name("_CRS", crs))


def dsdt(*, virtio_devices: list[tuple[int, int, int]], serial: bool, i8042: bool,
         pci: PciHostBridge | None = None) -> bytes:
    """The DSDT for ``virtio_devices`` given as ``(base, size, gsi)``, validated by the caller,
    and for the PCI host bridge ``pci`` if there is one."""
    devices: list[bytes] = []
    if serial:
        devices.append(_com1())
    if i8042:
        devices.append(_i8042())
    devices.extend(_virtio(i, base, size, gsi) for i, (base, size, gsi) in enumerate(virtio_devices))
    if pci is not None:
        devices.extend(pci_devices(pci))
    body = _s5() + aml.scope("\\_SB_", *devices)
    return sdt(b"DSDT", DSDT_REVISION, b"AVMMDSDT", body)
