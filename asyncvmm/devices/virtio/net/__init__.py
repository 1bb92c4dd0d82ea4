"""virtio-net device on a tap, with the MMDS on listed interfaces and rx/tx rate limiters."""

from asyncvmm.devices.virtio.net.device import Net, TapBackend, random_mac
from asyncvmm.devices.virtio.net.metrics import NetMetrics

__all__ = ["Net", "NetMetrics", "TapBackend", "random_mac"]
