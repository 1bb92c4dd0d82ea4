"""The host bridge: the function in slot 0 of bus 0, which only identifies itself.

Its identity is what Firecracker's guests see in ``lspci`` (00:00.0 Host
bridge: Intel Corporation Device 0d57): vendor 0x8086, device 0x0D57, class
0x060000 (base class 06 bridge, sub-class 00 host bridge, PCI 3.0 appendix
D), revision 0, no BARs, no capabilities, no interrupt pin.  Its windows and
bus range are described to the guest by ACPI (``_CRS`` of PNP0A08), not
here.  Sans-I/O: a :class:`~asyncvmm.pci.config.ConfigSpace` and nothing else.
"""

from __future__ import annotations

from asyncvmm.pci.bus import PciFunction
from asyncvmm.pci.config import ConfigSpace

PCI_VENDOR_ID_INTEL = 0x8086
HOST_BRIDGE_DEVICE_ID = 0x0D57
PCI_CLASS_BRIDGE_HOST = 0x0600          # base class << 8 | sub-class (pci_ids.h)


class HostBridge(PciFunction):
    """A :class:`~asyncvmm.pci.bus.PciFunction` with the host bridge's configuration space."""

    def __init__(self) -> None:
        self.config = ConfigSpace(vendor_id=PCI_VENDOR_ID_INTEL, device_id=HOST_BRIDGE_DEVICE_ID,
                                  class_code=PCI_CLASS_BRIDGE_HOST << 8)

    def config_read(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)
