"""virtio-pmem (persistent memory) device."""

from asyncvmm.devices.virtio.pmem.device import Pmem, PmemState
from asyncvmm.devices.virtio.pmem.metrics import PmemMetrics

__all__ = ["Pmem", "PmemMetrics", "PmemState"]
