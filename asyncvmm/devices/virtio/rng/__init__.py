"""virtio-rng (entropy) device."""

from asyncvmm.devices.virtio.rng.device import Rng
from asyncvmm.devices.virtio.rng.metrics import EntropyMetrics

__all__ = ["EntropyMetrics", "Rng"]
