"""The PCI host bridge as ACPI describes it: the MCFG table and the DSDT's PC00 and MRES devices.

Contract: :class:`PciHostBridge` is a validated description (construction
raises :class:`~.sdt.AcpiError` for ranges that overlap, are misaligned or
do not fit their descriptors); :func:`mcfg` and :func:`pci_devices` turn it
into table bytes and AML.  No I/O.

What Linux does with each piece:

* MCFG (PCI Firmware Specification 3.2, section 4.1.2) gives the ECAM base
  for segment 0 and its bus range; ``pci_mmcfg_late_init`` uses it only if
  a PNP0C01/PNP0C02 device's ``_CRS`` covers the range, hence ``MRES``.
* ``PC00`` (PNP0A08, PCI Express root, compatible with PNP0A03) carries the
  bridge's windows in ``_CRS`` as *producer* address descriptors; Linux
  takes them as root bus resources (``pci=use_crs`` is its default without
  an old DMI BIOS date).  ``IO (0xCF8, 8)`` is a consumer: the bridge
  decodes configuration mechanism #1 itself, and x86 Linux drops exactly
  that range from the root bus resources.
* ``_BBN`` and the bus-number descriptor must agree with the MCFG bus range,
  or Linux reports that MMCONFIG "only partially covers this bridge".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import combinations, product

from .. import layout
from . import aml
from .resources import dword_memory, io, memory32_fixed, qword_memory, resource_template, \
    word_bus_number
from .sdt import AcpiError, sdt

PCI_HOST_BRIDGE_NAME = "PC00"
MOTHERBOARD_RESOURCES_NAME = "MRES"
PCI_EXPRESS_ROOT_HID = "PNP0A08"
PCI_ROOT_CID = "PNP0A03"
MOTHERBOARD_RESOURCES_HID = "PNP0C02"

MCFG_REVISION = 1
ECAM_BUS_SIZE = layout.PCI_ECAM_BUS0_SIZE   # 1 MiB of configuration space per bus
WINDOW_ALIGN = 0x1000                        # windows are mapped page by page
PCI_SEGMENT = 0

# Fixed hardware inside the 32-bit gap that no PCI range may cover.
_FIXED_RANGES = [("the IOAPIC", layout.IOAPIC_ADDR, 0x1000),
                 ("the local APIC", layout.LAPIC_ADDR, 0x1000)]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class PciHostBridge:
    """Segment 0's host bridge: ECAM at ``ecam_base`` (bus 0's address), buses
    ``bus_start..bus_end``, and its two memory windows as ``(start, size)``:
    ``mmio32`` below 4 GiB (a DWord descriptor), ``mmio64`` above (a QWord one).
    """

    ecam_base: int
    ecam_size: int
    bus_start: int = 0
    bus_end: int = 0
    mmio32: tuple[int, int]
    mmio64: tuple[int, int]

    def __post_init__(self) -> None:
        windows_ok = all(isinstance(w, tuple) and len(w) == 2 for w in (self.mmio32, self.mmio64))
        if not windows_ok or not all(map(_is_int, (self.ecam_base, self.ecam_size, self.bus_start,
                                                   self.bus_end, *self.mmio32, *self.mmio64))):
            raise AcpiError(f"PCI host bridge description needs integers and (start, size) "
                            f"windows: {self!r}")
        if not 0 <= self.bus_start <= self.bus_end <= 0xFF:
            raise AcpiError(f"PCI bus range {self.bus_start}..{self.bus_end} is not within 0..255")
        if self.ecam_base % ECAM_BUS_SIZE or self.ecam_size <= 0 or self.ecam_size % ECAM_BUS_SIZE:
            raise AcpiError(f"ECAM {self.ecam_base:#x}+{self.ecam_size:#x} is not whole buses "
                            f"of {ECAM_BUS_SIZE:#x} bytes")
        if self.ecam_base + self.ecam_size > 1 << 32:
            raise AcpiError(f"ECAM {self.ecam_base:#x}+{self.ecam_size:#x} does not fit below "
                            "4 GiB (Memory32Fixed in MRES)")
        if (self.bus_end + 1) * ECAM_BUS_SIZE > self.ecam_size:
            raise AcpiError(f"ECAM of {self.ecam_size:#x} bytes cannot decode bus {self.bus_end}")
        for label, (start, size), low, high in (("mmio32", self.mmio32, 0, 1 << 32),
                                                ("mmio64", self.mmio64, 1 << 32, 1 << 64)):
            if size <= 0 or start % WINDOW_ALIGN or size % WINDOW_ALIGN:
                raise AcpiError(f"PCI window {label} {start:#x}+{size:#x} is empty or not "
                                f"{WINDOW_ALIGN:#x}-aligned")
            if start < low or start + size > high:
                raise AcpiError(f"PCI window {label} {start:#x}+{size:#x} is outside "
                                f"{low:#x}..{high:#x}")
        ours = self.ranges()
        pairs = [*combinations(ours, 2), *product(ours, _FIXED_RANGES)]
        for (label, start, size), (other, o_start, o_size) in pairs:
            if _overlap((start, size), (o_start, o_size)):
                raise AcpiError(f"{label} {start:#x}+{size:#x} overlaps {other}")

    @property
    def ecam(self) -> tuple[int, int]:
        """``(base, size)`` of the whole ECAM range: what MRES claims and e820 reserves."""
        return self.ecam_base, self.ecam_size

    @classmethod
    def for_layout(cls, ram_end: int) -> PciHostBridge:
        """The bridge of asyncvmm's memory map (layout.py) for RAM ending at ``ram_end``."""
        return cls(ecam_base=layout.PCI_ECAM_START, ecam_size=layout.PCI_ECAM_SIZE,
                   mmio32=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - layout.PCI_MMIO32_START),
                   mmio64=layout.pci_mmio64_window(ram_end))

    def ranges(self) -> list[tuple[str, int, int]]:
        """``(name, start, size)`` of the ECAM and both windows, for the caller's overlap checks."""
        return [("PCI ECAM", *self.ecam), ("PCI mmio32 window", *self.mmio32),
                ("PCI mmio64 window", *self.mmio64)]


def mcfg(pci: PciHostBridge) -> bytes:
    """MCFG: 8 reserved bytes, then one allocation structure (PCI Firmware 3.2, Table 4-3).

    The base address is that of bus 0 even when ``bus_start`` is higher.
    """
    allocation = struct.pack("<QHBBI", pci.ecam_base, PCI_SEGMENT, pci.bus_start, pci.bus_end, 0)
    return sdt(b"MCFG", MCFG_REVISION, b"AVMMMCFG", bytes(8) + allocation)


def _host_bridge(pci: PciHostBridge) -> bytes:
    crs = resource_template(
        word_bus_number(pci.bus_start, pci.bus_end - pci.bus_start + 1),
        io(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT, 1, layout.PCI_CONFIG_IO_SIZE),
        dword_memory(*pci.mmio32, consumer=False),
        qword_memory(*pci.mmio64, consumer=False))
    return aml.device(
        PCI_HOST_BRIDGE_NAME,
        aml.name("_HID", aml.eisa_id(PCI_EXPRESS_ROOT_HID)),
        aml.name("_CID", aml.eisa_id(PCI_ROOT_CID)),
        aml.name("_ADR", aml.integer(0)),
        aml.name("_SEG", aml.integer(PCI_SEGMENT)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_BBN", aml.integer(pci.bus_start)),
        aml.name("_CRS", crs))


def _motherboard_resources(pci: PciHostBridge) -> bytes:
    return aml.device(
        MOTHERBOARD_RESOURCES_NAME,
        aml.name("_HID", aml.eisa_id(MOTHERBOARD_RESOURCES_HID)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", resource_template(memory32_fixed(*pci.ecam))))


def pci_devices(pci: PciHostBridge) -> list[bytes]:
    """The AML Device objects for ``\\_SB_``: the host bridge, then the ECAM's motherboard resource."""
    return [_host_bridge(pci), _motherboard_resources(pci)]
