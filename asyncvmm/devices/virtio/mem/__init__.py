"""virtio-mem device (memory hotplug)."""

from asyncvmm.devices.virtio.mem.device import VirtioMem, VirtioMemError
from asyncvmm.devices.virtio.mem.metrics import VirtioMemMetrics

__all__ = ["VirtioMem", "VirtioMemError", "VirtioMemMetrics"]
